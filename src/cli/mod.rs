//! The command line. The binary only calls [`main`]; each subcommand is a thin layer over the
//! library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::engine::{Engine, RuleOutcome};
use crate::message::{Identity, Message};
use crate::outcome::store::StoreOptions;
use crate::outcome::{Code, codes};
use crate::rules::{Compiler, RuleSet};

pub mod consume;
pub mod logs;

/// iotfwd: a rules-engine forwarding daemon for IoT messages.
///
/// It takes device messages in, evaluates SQL forwarding rules over them
/// (`SELECT ... FROM "/pk/+/user/update" WHERE ...`), forwards the results, and logs every
/// step's outcome with the IoT platform's status codes.
#[derive(Debug, Parser)]
#[command(name = "iotfwd", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. Without --config it starts on the embedded default, which needs no
    /// broker: HTTP on 127.0.0.1:8080, rules from ./rules, data under ./data.
    Run {
        /// The config file (TOML). Every setting is optional; see README "Configuration".
        #[arg(long, short, env = "IOTFWD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config and every rule file; report every problem with its file and line.
    Check {
        #[arg(long, short, env = "IOTFWD_CONFIG")]
        config: Option<PathBuf>,
        /// The rules directory (default: rules.dir from the config, else ./rules).
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// Work with rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Print the status code catalog, or one code's meaning, cause and troubleshooting.
    Codes {
        /// A code, e.g. 9307.
        code: Option<u16>,
    },
    /// Post one message to a running daemon and print its result.
    Send {
        /// The message topic, e.g. /a1b2c3/dev01/thing/event/property/post.
        #[arg(long)]
        topic: String,
        /// The payload: JSON text, or @FILE to read it from a file.
        #[arg(long)]
        payload: String,
        /// The daemon's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Also print each matched rule's output.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        verbose: bool,
    },
    /// Consume a consumer group from the AMQP 1.0 endpoint, as a platform consumer would (the
    /// login is signed as in README "Consumer groups"). Prints one JSON line per message: its
    /// application properties and body. For debugging and demos.
    Consume {
        /// The consumer group.
        #[arg(long)]
        group: String,
        /// The endpoint.
        #[arg(long, default_value = "amqp://127.0.0.1:5673")]
        url: String,
        /// The daemon's config, to find the group's AccessKey id and secret (default: the
        /// embedded default, whose `demo` group's secret is in data/demo-group.secret).
        #[arg(long, short, env = "IOTFWD_CONFIG")]
        config: Option<PathBuf>,
        /// The AccessKey id (default: the group's, from the config).
        #[arg(long)]
        access_key_id: Option<String>,
        /// The AccessKey secret (default: the group's, from the config).
        #[arg(long, env = "IOTFWD_GROUP_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Release each message instead of accepting it (it is redelivered: 9651).
        #[arg(long, conflicts_with_all = ["reject", "no_ack"])]
        release: bool,
        /// Reject each message (9652: to the rule's error action, never redelivered).
        #[arg(long, conflicts_with = "no_ack")]
        reject: bool,
        /// Settle nothing (after the group's ack_timeout_ms each is 9650 and redelivered).
        #[arg(long)]
        no_ack: bool,
        /// Stop after this many messages (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// hmacsha1 or hmacsha256.
        #[arg(long, default_value = "hmacsha1")]
        sign_method: String,
        /// The idle time-out to announce, ms (30000..=300000 is accepted).
        #[arg(long, default_value_t = 60_000)]
        idle_timeout_ms: u32,
        /// The client id (default: iotfwd-consume-<pid>).
        #[arg(long)]
        client_id: Option<String>,
        /// For an amqps:// URL: the PEM file of the CA (or self-signed certificate) to trust.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Query the outcome records (one per step of each message) in the record store, like the
    /// IoT console's log search; `iotfwd logs trace ID` follows one message. Reads the store
    /// file directly: the daemon need not run.
    Logs(Box<logs::LogsCmd>),
    /// Benchmarks (not tests): each prints its rate and the ratio to a baseline measured in the
    /// same run.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run one message through one rule with the daemon's own engine. Prints the output object
    /// (one JSON line) when the rule matches; prints nothing on stdout and the reason on stderr
    /// when it does not. Exits non-zero with the code (9307, 9320) for a bad rule or payload.
    Test {
        /// The rule file.
        rule_file: PathBuf,
        /// The message topic.
        #[arg(long)]
        topic: String,
        /// The payload: JSON text, or @FILE.
        #[arg(long)]
        payload: String,
        /// Message time in ms since the epoch (default: now), for timestamp().
        #[arg(long)]
        timestamp: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Push throughput of the AMQP 1.0 consumer-group endpoint to consumers that accept every
    /// message, on 1 and 4 connections, against the engine's ingest rate (10 rules) measured
    /// in the same run. Needs no broker.
    Groups {
        /// Messages per push run.
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// Consumer connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        connections: Vec<usize>,
    },
    /// The record store: fills N records of realistic shape through the writer (the sustained
    /// insert rate, against 3 records per message at the engine's rate measured in the same
    /// run), then times the console's lookups and a keyword scan, each next to its target.
    Logs {
        /// Records to fill.
        #[arg(long, default_value_t = 10_000_000)]
        records: usize,
        /// The store file (default: a new file in the temp directory, deleted afterwards).
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// Keep the store file afterwards.
        #[arg(long)]
        keep: bool,
        /// Random trace ids (as envelopes may bring them) instead of the daemon's
        /// time-ordered generated ones.
        #[arg(long)]
        random_trace_ids: bool,
        /// Tune the writer with this config file's [store] section (batch, commit interval,
        /// checkpoint size; its path is ignored). Default: the built-in defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Engine throughput on generated property-post messages (no I/O), against a parse-only
    /// baseline (serde_json parse of the same payloads) measured in the same run.
    Engine {
        /// Number of filter-and-projection rules.
        #[arg(long, default_value_t = 10)]
        rules: usize,
        /// Number of messages per measurement.
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// Micro-batch size.
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Measure quotas on (100 tenants, 100 000 devices, none throttled) against quotas
        /// off instead of the parse-only baseline.
        #[arg(long)]
        quotas: bool,
    },
    /// RabbitMQ -> iotfwd (10 rules) -> RabbitMQ with confirms, against a bare lapin relay
    /// (consume -> publish -> ack, same prefetch and confirm window) in the same run; then the
    /// end-to-end latency at half the measured rate. Needs a broker.
    Pipeline {
        /// The broker to run against.
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        /// Messages per throughput measurement.
        #[arg(long, default_value_t = 50_000)]
        messages: usize,
        /// Prefetch of both consumers.
        #[arg(long, default_value_t = 256)]
        prefetch: u16,
        /// Publisher-confirm window of both publishers.
        #[arg(long, default_value_t = 256)]
        confirm_window: usize,
        /// Rules in iotfwd (each message matches one).
        #[arg(long, default_value_t = 10)]
        rules: usize,
        /// Run iotfwd with this config file (for its [store], [quota], [log] and other
        /// tuning); the benchmark replaces its [broker], [source], rules and data directories.
        /// Default: the built-in defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::Consume {
            group,
            url,
            config,
            access_key_id,
            secret,
            release,
            reject,
            no_ack,
            count,
            sign_method,
            idle_timeout_ms,
            client_id,
            ca,
        } => {
            let settle = if release {
                consume::Settle::Release
            } else if reject {
                consume::Settle::Reject
            } else if no_ack {
                consume::Settle::None
            } else {
                consume::Settle::Accept
            };
            consume::run(consume::Args {
                group,
                url,
                config,
                access_key_id,
                secret,
                settle,
                count,
                sign_method,
                idle_timeout_ms,
                client_id,
                ca,
            })
        }
        Command::Check { config, rules } => check(config.as_deref(), rules.as_deref()),
        Command::Rules {
            command:
                RulesCommand::Test {
                    rule_file,
                    topic,
                    payload,
                    timestamp,
                },
        } => rules_test(&rule_file, topic, &payload, timestamp),
        Command::Codes { code } => codes_cmd(code),
        Command::Logs(cmd) => logs::run(*cmd),
        Command::Bench {
            command:
                BenchCommand::Logs {
                    records,
                    db,
                    keep,
                    random_trace_ids,
                    config,
                },
        } => {
            let store = match config {
                Some(p) => match load_config(Some(&p)) {
                    Ok(c) => c.store,
                    Err(code) => return code,
                },
                None => Default::default(),
            };
            crate::bench::logs::run(
                records,
                db,
                keep,
                random_trace_ids,
                StoreOptions::from_config(&store),
            )
        }
        Command::Send {
            topic,
            payload,
            url,
            verbose,
        } => send(&url, topic, &payload, verbose),
        Command::Bench {
            command:
                BenchCommand::Groups {
                    messages,
                    connections,
                },
        } => match crate::bench::groups::run(messages, &connections) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench {
            command:
                BenchCommand::Pipeline {
                    url,
                    messages,
                    prefetch,
                    confirm_window,
                    rules,
                    config,
                },
        } => {
            let base = match config {
                Some(p) => match load_config(Some(&p)) {
                    Ok(c) => c,
                    Err(code) => return code,
                },
                None => Config::default(),
            };
            let bench = crate::bench::pipeline::PipelineBench {
                url,
                messages,
                prefetch,
                confirm_window,
                rules,
                base,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            match runtime.block_on(crate::bench::pipeline::run(bench)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench {
            command:
                BenchCommand::Engine {
                    rules,
                    messages,
                    batch,
                    quotas,
                },
        } => {
            if quotas {
                crate::bench::engine::engine_quotas(rules, messages, batch);
            } else {
                crate::bench::engine::engine(rules, messages, batch);
            }
            ExitCode::SUCCESS
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
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

fn run(config_path: Option<&Path>) -> ExitCode {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = crate::daemon::Listeners::bind(&config).await?;
        crate::daemon::run_from_file(
            config,
            config_path,
            listeners,
            crate::daemon::shutdown_signal(),
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(config_path: Option<&Path>, rules_dir: Option<&Path>) -> ExitCode {
    let mut problems: Vec<String> = Vec::new();
    let config = match config_path {
        None => Config::embedded_default(),
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(errors) => {
                problems.extend(errors.iter().map(ToString::to_string));
                Config::default()
            }
        },
    };
    let dir = rules_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| config.rules.dir.clone());
    let compiler = Compiler::new(config.engine.max_variants_per_rule);
    let (rules, errors) = compiler.load_dir(&dir);
    problems.extend(errors.iter().map(ToString::to_string));
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!(
            "{} problem(s); {} rule(s) in {} loaded",
            problems.len(),
            rules.len(),
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    // A group action naming no [[group]] would end in 9325 at run time: say so now.
    for rule in &rules {
        for action in rule.actions.iter().chain(rule.error_action.as_ref()) {
            if let crate::rules::ActionSpec::Group(g) = action
                && config.group(&g.group).is_none()
            {
                eprintln!(
                    "warning: {}: group {:?} is not a [[group]] of the config; its forwards will fail with 9325",
                    rule.file.display(),
                    g.group
                );
            }
        }
    }
    let config_name = config_path.map_or("embedded default config".to_owned(), |p| {
        p.display().to_string()
    });
    println!(
        "ok: {config_name}, {} rule(s) in {} ({})",
        rules.len(),
        dir.display(),
        rules
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    ExitCode::SUCCESS
}

/// Reads `@FILE` or returns the text itself.
fn payload_arg(arg: &str) -> Result<Vec<u8>, String> {
    match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read(path).map_err(|e| format!("cannot read payload file {path}: {e}"))
        }
        None => Ok(arg.as_bytes().to_vec()),
    }
}

fn rules_test(rule_file: &Path, topic: String, payload: &str, timestamp: Option<i64>) -> ExitCode {
    let payload = match payload_arg(payload) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let compiler = Arc::new(Compiler::new(32));
    let rule = match compiler.load_file(rule_file) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let rule_name = rule.name.clone();
    let message = match Message::new(
        topic,
        payload.into(),
        Identity {
            timestamp_ms: timestamp,
            ..Identity::default()
        },
    ) {
        Ok(m) => m,
        Err(rejection) => {
            eprintln!("error: {}", crate::outcome::Failure::rejected(&rejection));
            return ExitCode::FAILURE;
        }
    };
    let mut rule = rule;
    // `rules test` runs a disabled rule too: the point is to try it before enabling it.
    rule.enabled = true;
    let engine = Engine::new(compiler, Arc::new(RuleSet::new(vec![rule])));
    let results = engine.evaluate(std::slice::from_ref(&message)).remove(0);
    let Some(result) = results.into_iter().next() else {
        eprintln!(
            "no match: topic {:?} does not match the rule's FROM filter {:?}",
            message.topic,
            engine.rules().rules()[0].program.parsed.filter.as_str()
        );
        return ExitCode::SUCCESS;
    };
    match result.outcome {
        RuleOutcome::Passed(output) => {
            println!("{}", serde_json::Value::Object(output));
            ExitCode::SUCCESS
        }
        RuleOutcome::NoResult => {
            eprintln!("no match: WHERE is false or NULL for this message (rule {rule_name})");
            ExitCode::SUCCESS
        }
        RuleOutcome::Failed(failure) => {
            let code = failure.code();
            eprintln!("error: {failure}");
            eprintln!("{}: {}", code, code.info().meaning);
            ExitCode::FAILURE
        }
    }
}

fn codes_cmd(code: Option<u16>) -> ExitCode {
    match code {
        None => {
            print!("{}", codes::render_catalog());
            ExitCode::SUCCESS
        }
        Some(c) => match codes::lookup(c) {
            Some(info) => {
                print!("{}", codes::render_one(info));
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "error: unknown code {c}; known codes: {}",
                    Code::ALL
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::from(2)
            }
        },
    }
}

fn send(url: &str, topic: String, payload: &str, verbose: bool) -> ExitCode {
    let payload = match payload_arg(payload) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Send JSON payloads as JSON; anything else as base64, so binary payloads go through too.
    let envelope = match serde_json::from_slice::<serde_json::Value>(&payload) {
        Ok(value) => serde_json::json!({ "topic": topic, "payload": value }),
        Err(_) => {
            use base64::Engine as _;
            serde_json::json!({
                "topic": topic,
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(&payload),
            })
        }
    };
    let endpoint = format!(
        "{}/api/v1/messages?verbose={verbose}",
        url.trim_end_matches('/')
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(&endpoint)
            .json(&envelope)
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    match result {
        Ok((status, body)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&body)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or(body.clone()))
                .unwrap_or(body);
            println!("{pretty}");
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: the daemon answered {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: cannot reach the daemon at {endpoint}: {e}");
            ExitCode::FAILURE
        }
    }
}
