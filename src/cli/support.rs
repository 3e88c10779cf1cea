//! What the commands share: loading a config file, reading an `@FILE` argument, the async
//! runtime, and turning a result into an exit code. Each prints its own error, so a command
//! only returns the code.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// The config file at `path`, or the embedded default without one. A file that does not load
/// prints every problem and `N problem(s) in the config; nothing started`: exit 2.
pub(super) fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::embedded_default()),
        Some(p) => Config::load(p).map_err(|errors| {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} problem(s) in the config; nothing started", errors.len());
            ExitCode::from(2)
        }),
    }
}

/// The bytes of a `JSON|@FILE` argument: the file's for `@FILE`, else the text itself. A file
/// that cannot be read is an error: exit 2.
pub(super) fn payload_arg(arg: &str) -> Result<Vec<u8>, ExitCode> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read(path).map_err(|e| {
            eprintln!("error: cannot read payload file {path}: {e}");
            ExitCode::from(2)
        }),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

/// The kind of tokio runtime a command runs on.
pub(super) enum Runtime {
    /// One thread: a client (`send`, `consume`).
    CurrentThread,
    /// A worker per core: the daemon and the benchmarks that drive it.
    MultiThread,
}

/// Runs `work` to its end on a new runtime of `kind` and returns its exit code. A runtime that
/// cannot start is an error: exit 1.
pub(super) fn block_on(kind: Runtime, work: impl Future<Output = ExitCode>) -> ExitCode {
    let mut builder = match kind {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    };
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(work),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit 0 for `Ok`; for an error, its whole chain on stderr and exit 1.
pub(super) fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
