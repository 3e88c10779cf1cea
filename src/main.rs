//! The `iotfwd` binary: the command line only; the library holds the logic.

fn main() -> std::process::ExitCode {
    iotfwd::cli::main()
}
