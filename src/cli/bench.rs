//! `iotfwd bench ...`: the benchmarks of [`crate::bench`].

use std::path::PathBuf;
use std::process::ExitCode;

use super::BenchCommand;
use super::support::{Runtime, block_on, exit_code, load_config};
use crate::config::Config;
use crate::outcome::store::StoreOptions;

pub(super) fn run(command: BenchCommand) -> ExitCode {
    match command {
        BenchCommand::Logs {
            records,
            db,
            keep,
            random_trace_ids,
            config,
            postgres,
        } => {
            let store = match tuning(config) {
                Ok(c) => c.store,
                Err(code) => return code,
            };
            crate::bench::logs::run(
                records,
                db,
                keep,
                random_trace_ids,
                StoreOptions::from_config(&store),
                postgres,
            )
        }
        BenchCommand::Groups {
            messages,
            connections,
            backlog,
        } => exit_code(crate::bench::groups::run(messages, &connections, &backlog)),
        BenchCommand::Pipeline {
            url,
            source,
            mqtt_url,
            messages,
            prefetch,
            confirm_window,
            rules,
            config,
        } => {
            let base = match tuning(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let bench = crate::bench::pipeline::PipelineBench {
                url,
                mqtt_source: source == "mqtt",
                mqtt_url,
                messages,
                prefetch,
                confirm_window,
                rules,
                base,
            };
            block_on(Runtime::MultiThread, async {
                exit_code(crate::bench::pipeline::run(bench).await)
            })
        }
        BenchCommand::Ingest {
            messages,
            per_request,
            clients,
            rules,
            config,
        } => {
            let base = match tuning(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // Log as the daemon would, so the per-message cost of logging is in the figures.
            crate::telemetry::init_tracing(
                &base.log.level,
                base.log.format == crate::config::LogFormat::Json,
            );
            let engine_rate = crate::bench::engine::engine_rate(rules, messages);
            let bench = crate::bench::ingest::ScaleBench {
                messages,
                per_request,
                clients,
                rules,
                base,
            };
            block_on(Runtime::MultiThread, async {
                exit_code(crate::bench::ingest::scale(&bench, engine_rate).await)
            })
        }
        BenchCommand::Engine {
            rules,
            messages,
            batch,
            quotas,
            devices,
            redis,
            lease,
            lease_rate_ms,
        } => {
            if quotas {
                let run = crate::bench::engine::engine_quotas(
                    rules,
                    messages,
                    batch,
                    devices,
                    redis.as_deref(),
                    crate::bench::engine::Leases {
                        lease,
                        rate_ms: lease_rate_ms,
                    },
                );
                if let Err(e) = run {
                    eprintln!("error: {e:#}");
                    return ExitCode::FAILURE;
                }
            } else {
                crate::bench::engine::engine(rules, messages, batch);
            }
            ExitCode::SUCCESS
        }
    }
}

/// The config file a benchmark takes its tuning from (--config), else the built-in defaults
/// (not the embedded default: a benchmark brings its own rules and groups).
fn tuning(config: Option<PathBuf>) -> Result<Config, ExitCode> {
    match config {
        Some(p) => load_config(Some(&p)),
        None => Ok(Config::default()),
    }
}
