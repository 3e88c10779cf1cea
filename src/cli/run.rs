//! `iotfwd run`: the daemon, until SIGTERM or Ctrl-C.

use std::path::Path;
use std::process::ExitCode;

use super::support::{Runtime, block_on, exit_code, load_config};
use crate::config::{Config, LogFormat};

pub(super) fn run(config_path: Option<&Path>) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init_tracing(&config.log.level, config.log.format == LogFormat::Json);
    match config_path {
        Some(p) => tracing::info!(config = %p.display(), "config loaded"),
        None => tracing::info!(
            "no --config: embedded default (HTTP {}, rules from {}, data under {}; no broker needed)",
            config.http.listen,
            config.rules.dir.display(),
            config.data.dir.display()
        ),
    }
    block_on(Runtime::MultiThread, async {
        let result = serve(config, config_path).await;
        if let Err(e) = &result {
            // Into the daemon's log as well as on the terminal.
            tracing::error!("{e:#}");
        }
        exit_code(result)
    })
}

async fn serve(config: Config, config_path: Option<&Path>) -> anyhow::Result<()> {
    let listeners = crate::daemon::Listeners::bind(&config).await?;
    crate::daemon::run_from_file(
        config,
        config_path,
        listeners,
        crate::daemon::shutdown_signal(),
    )
    .await
}
