//! The `iotfwd` binary: the command line only; the library holds the logic.

/// mimalloc instead of glibc's malloc: the engine allocates per message (outputs, documents)
/// and frees them a batch later on another thread; glibc's malloc and free were a quarter of
/// `bench engine`'s time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    iotfwd::cli::main()
}
