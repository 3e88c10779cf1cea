//! The command line. The binary only calls [`main`]. This file holds the clap definitions
//! ([`Cli`], [`Command`] and their arguments) and the dispatch; each command has its own file,
//! which parses what clap left as text, calls the library and prints: `run`, `check` (the
//! report of [`crate::control::check`]), `rules` (`rules test`), `codes`, `send`, `consume`,
//! `logs`, `dlq`, `bench`. `support` holds what several commands share: loading a config file, an
//! `@FILE` argument, the async runtime, an exit code from a result.
//!
//! Exit codes, throughout: 0 done; 1 the command ran and failed or found a problem (a bad rule
//! or config in `check`, a bad rule, payload or topic in `rules test`, a peer that does not
//! answer); 2 the command could not start on its input (a config that does not load, an
//! unreadable `@FILE`, an unknown code or flag value), so nothing was done.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod check;
mod codes;
mod consume;
pub mod dlq;
pub mod logs;
mod rules;
mod run;
mod send;
mod support;

/// iotfwd: a rules-engine forwarding daemon for IoT messages.
///
/// It takes device messages in, evaluates SQL forwarding rules over them
/// (`SELECT ... FROM "/pk/+/user/update" WHERE ...`), forwards the results, and logs every
/// step's outcome with the IoT platform's status codes.
#[derive(Debug, Parser)]
#[command(
    name = "iotfwd",
    version,
    about,
    long_about,
    after_help = "Start with `iotfwd run` (it needs no config and no broker) and `iotfwd check`. \
        Every setting and command: docs/configuration.md; rule files and SQL: \
        docs/rules-and-sql.md. `iotfwd <COMMAND> --help` gives each command's options, \
        defaults and exit status."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. Without --config it starts on the embedded default, which needs no
    /// broker: HTTP on 127.0.0.1:8080, rules from ./rules, data under ./data.
    ///
    /// The embedded default also hosts the AMQP 1.0 consumer-group endpoint on 127.0.0.1:5673
    /// with one group, `demo` (docs/consumer-groups.md). The rules reload when a file in the
    /// rules directory changes, on SIGHUP and on POST /api/v1/rules/reload; SIGTERM or Ctrl-C
    /// stops intake and lets in-flight work drain for up to shutdown.grace_ms
    /// (docs/operations.md).
    ///
    /// An http.listen beyond loopback needs [[http.token]] entries (or http.allow_anonymous =
    /// true); each token is read from its env variable or file at start (docs/security.md).
    ///
    /// Exit status: 0 after a clean shutdown; 1 when the daemon cannot start or fails (a port
    /// in use, a token that cannot be read, a stage that died); 2 when the config does not load (every problem is printed
    /// with its line, and nothing starts).
    Run {
        /// The config file (TOML); every setting is optional, unknown keys are errors
        /// (docs/configuration.md). Default: the embedded default.
        #[arg(long, short, env = "IOTFWD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config and every rule file; report every problem with its file and line.
    ///
    /// Loads the config and every *.toml rule file of the rules directory as `iotfwd run`
    /// would, and reports every problem at once (docs/configuration.md,
    /// docs/rules-and-sql.md). It also warns about what loads but would fail at run time: a
    /// group action naming no `[[group]]` of the config (its forwards would end in 9325), an
    /// `[[http.token]]` whose value cannot be read here (docs/security.md).
    ///
    /// Exit status: 0 when nothing is wrong (a one-line summary on stdout: the config and the
    /// rules that loaded; warnings on stderr); 1 on any problem (each on stderr with its file
    /// and line, then their count).
    Check {
        /// The config file to check (default: the embedded default).
        #[arg(long, short, env = "IOTFWD_CONFIG")]
        config: Option<PathBuf>,
        /// The rules directory (default: rules.dir from the config, else ./rules).
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// Work with rule files (docs/rules-and-sql.md).
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Print the status code catalog, or one code's meaning, cause and troubleshooting.
    ///
    /// The codes are the IoT platform's; every outcome record carries one (docs/logs.md,
    /// "Outcomes and codes").
    ///
    /// Exit status: 0; 2 for a code that is not in the catalog (the known codes are listed).
    Codes {
        /// A code, e.g. 9307 (default: the whole catalog, one line per code).
        code: Option<u16>,
    },
    /// Post one message to a running daemon and print its result.
    ///
    /// Sends the message to the daemon's ingest route, POST /api/v1/messages (docs/api.md): a
    /// JSON payload as JSON, anything else as payload_base64. Prints the daemon's answer
    /// (pretty-printed JSON): the message's ids and code, and each matched rule's result and
    /// its actions' outcomes.
    ///
    /// A daemon with [[http.token]] entries needs a token with scope `ingest`: --token or
    /// IOTFWD_TOKEN (docs/security.md). A daemon with [http.tls] is reached at https://, trusting
    /// --ca-file or IOTFWD_CA_FILE (else the system's root certificates).
    ///
    /// Exit status: 0 when the daemon answers with a success status (the answer may still give
    /// the message a failure code, e.g. 1903); 1 when it cannot be reached (a TLS handshake that
    /// fails says why) or answers with an error status (401: no or a wrong token); 2 when
    /// --payload @FILE cannot be read or --url is not a URL.
    Send(SendArgs),
    /// Consume a consumer group from the AMQP 1.0 endpoint, as a platform consumer would.
    /// Prints one JSON line per message: its application properties and body. For debugging
    /// and demos.
    ///
    /// The login is signed as the platform's consumers sign it, with the group's AccessKey id
    /// and secret (docs/consumer-groups.md). Each message is accepted, unless --release,
    /// --reject or --no-ack says otherwise. Runs until Ctrl-C or --count messages.
    ///
    /// Exit status: 0 when stopped by Ctrl-C or --count; 1 when the endpoint cannot be reached,
    /// refuses the login or closes the link; 2 when the credentials cannot be found (no such
    /// group in the config, a config that does not load, a secret that cannot be read) or
    /// --sign-method is unknown.
    Consume(ConsumeArgs),
    /// Query the outcome records (one per step of each message) in the record store, like the
    /// IoT console's log search; `iotfwd logs trace ID` follows one message. Reads the store
    /// file directly: the daemon need not run.
    ///
    /// Prints a table, newest first, 50 records a page (--json: JSON lines with the platform's
    /// field names); the cursor of the next page goes to stderr. docs/logs.md shows how to find
    /// why a message did not arrive.
    ///
    /// Exit status: 0, also when nothing matches; 1 when the store cannot be read or `trace`
    /// finds no record; 2 for a filter or a config that is not valid.
    Logs(Box<logs::LogsCmd>),
    /// Work the dead-letter queue of a running daemon: `list` what failed for good (with no
    /// error action to take it), `replay` it after a fix. Talks to the daemon's API
    /// (GET /api/v1/dlq, POST /api/v1/dlq/replay) at --url; docs/dead-letters.md.
    Dlq(dlq::DlqCmd),
    /// Benchmarks (not tests): each prints its rate and the ratio to a baseline measured in the
    /// same run.
    ///
    /// Measure a release build. docs/benchmarks.md gives each one's method and latest figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run one message through one rule with the daemon's own engine. Prints the output object
    /// (one JSON line) when the rule matches; prints nothing on stdout and the reason on stderr
    /// when it does not. Exits non-zero with the code for a bad rule, payload or topic.
    ///
    /// The rule runs even when its file says enabled = false, so it can be tried before it is
    /// enabled; its actions are not run. Rule files and the SQL dialect:
    /// docs/rules-and-sql.md.
    ///
    /// Exit status: 0 when the message was evaluated, matched or not; 1, with the code on
    /// stderr, for a rule file that does not load (9307, 9321), a payload that is not valid
    /// JSON (9320), a topic not of the platform's form (1903) or a function that fails on this
    /// message (9307); 2 when --payload @FILE cannot be read.
    Test(RuleTestArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Push throughput of the AMQP 1.0 consumer-group endpoint to consumers that accept every
    /// message, on 1 and 4 connections, with the backlog in memory and in the spool on disk,
    /// against the engine's ingest rate (10 rules) measured in the same run. Needs no broker.
    ///
    /// Method and figures: docs/benchmarks.md, "Consumer groups".
    Groups {
        /// Messages per push run.
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// Consumer connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        connections: Vec<usize>,
        /// Backlogs to measure, each on every connection count: `memory` (the baseline) and
        /// `spool` (on disk, as without a broker; printed with its ratio to memory).
        #[arg(long, value_delimiter = ',', default_value = "memory,spool")]
        backlog: Vec<crate::bench::groups::Backlog>,
    },
    /// The record store: fills N records of realistic shape through the writer (the sustained
    /// insert rate, against 3 records per message at the engine's rate measured in the same
    /// run), then times the console's lookups and a keyword scan, each next to its target.
    ///
    /// Method and figures: docs/benchmarks.md, "Record store".
    Logs {
        /// Records to fill.
        #[arg(long, default_value_t = 10_000_000)]
        records: usize,
        /// The store file (default: a new file in the temp directory, deleted afterwards). A
        /// file that exists (kept by --keep) is measured as it is, without a fill.
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// Keep the store file afterwards.
        #[arg(long)]
        keep: bool,
        /// Random trace ids (as envelopes may bring them) instead of the daemon's
        /// time-ordered generated ones.
        #[arg(long)]
        random_trace_ids: bool,
        /// Tune the writer with this config file's `[store]` section (batch, commit interval,
        /// checkpoint size; its path is ignored). Default: the built-in defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also fill the PostgreSQL store at this URL (an empty database, e.g. made with
        /// `createdb`; `postgres://user@host:5432/db`) with the same records in the same run,
        /// and time the same lookups there: its insert rate as a ratio of SQLite's.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
    },
    /// The HTTP ingest in-process: 1, 2 and 4 clients posting NDJSON requests of 1000 of the
    /// `bench engine` messages, 10 rules without actions, the record store on (as configured)
    /// and off; each rate beside `bench engine`'s rate measured in the same run, with the CPU
    /// time per message and the engine's and the commit wait's share of it.
    ///
    /// Method and figures: docs/benchmarks.md, "HTTP ingest".
    Ingest {
        /// Messages per measurement.
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// Messages per request.
        #[arg(long, default_value_t = 1000)]
        per_request: usize,
        /// Client counts to measure, each with the store on and off.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        clients: Vec<usize>,
        /// Rules in iotfwd (each message matches one by topic).
        #[arg(long, default_value_t = 10)]
        rules: usize,
        /// Run iotfwd with this config file's tuning (`[store]`, `[log]`, `[engine]`, ...);
        /// the benchmark replaces its rules and data directories. Default: the built-in
        /// defaults (the store on, `durability = "acked"`, `log.level = "info"`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Engine throughput on generated property-post messages (no I/O), against a parse-only
    /// baseline (sonic-rs parsing the same payloads; serde_json's parse printed beside it)
    /// measured in the same run, and the rule set's memory per rule.
    ///
    /// Method and figures: docs/benchmarks.md, "Engine" and "Quotas".
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
        /// Measure quotas on (100 tenants, --devices devices, none throttled) against quotas
        /// off instead of the parse-only baseline.
        #[arg(long)]
        quotas: bool,
        /// With --quotas: how many devices the messages come from.
        #[arg(long, default_value_t = 100_000, requires = "quotas")]
        devices: usize,
        /// With --quotas: also measure the buckets shared in this Redis (`[quota] backend =
        /// "redis"`, default leases) against local ones, e.g. redis://127.0.0.1:6379/0.
        #[arg(long, requires = "quotas")]
        redis: Option<String>,
        /// With --redis: the fewest tokens leased per round trip (`[quota] lease`; default its
        /// default).
        #[arg(long, requires = "redis")]
        lease: Option<u32>,
        /// With --redis: milliseconds of a scope's rate one lease may hold (`[quota]
        /// lease_rate_ms`; default its default; 0: every scope leases --lease).
        #[arg(long, requires = "redis")]
        lease_rate_ms: Option<u64>,
    },
    /// RabbitMQ -> iotfwd (10 rules) -> RabbitMQ with confirms, against a bare lapin relay
    /// (consume -> publish -> ack, same prefetch and confirm window) in the same run; then the
    /// end-to-end latency at half the measured rate. iotfwd runs with store.durability =
    /// "acked" and "async", and the HTTP ingest path (NDJSON requests of 1000 messages, 4
    /// clients, rules without actions) is measured in both modes too: each pair is printed as
    /// a ratio. Needs a broker.
    ///
    /// Method and figures: docs/benchmarks.md, "Pipeline".
    Pipeline {
        /// The RabbitMQ broker to run against (the destination; the source too unless
        /// `--source mqtt`).
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        /// Where the messages come from: a RabbitMQ queue (`amqp`), or topics of the MQTT
        /// broker `--mqtt-url` (`mqtt`: Mosquitto -> iotfwd -> RabbitMQ, against a bare MQTT
        /// relay).
        #[arg(long, default_value = "amqp", value_parser = ["amqp", "mqtt"])]
        source: String,
        /// The MQTT broker of `--source mqtt`.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        mqtt_url: String,
        /// Messages per throughput measurement.
        #[arg(long, default_value_t = 50_000)]
        messages: usize,
        /// Prefetch of both consumers (with `--source mqtt`: the receive maximum of both
        /// subscribers).
        #[arg(long, default_value_t = 256)]
        prefetch: u16,
        /// Publisher-confirm window of both publishers.
        #[arg(long, default_value_t = 256)]
        confirm_window: usize,
        /// Rules in iotfwd (each message matches one).
        #[arg(long, default_value_t = 10)]
        rules: usize,
        /// Run iotfwd with this config file (for its `[store]`, `[quota]`, `[log]` and other
        /// tuning); the benchmark replaces its `[broker]`, `[source]`, rules and data directories.
        /// Default: the built-in defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// `iotfwd send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The message topic, e.g. /a1b2c3/dev01/thing/event/property/post.
    #[arg(long)]
    pub topic: String,
    /// The payload: JSON text, or @FILE to read it from a file.
    #[arg(long, value_name = "JSON|@FILE")]
    pub payload: String,
    /// The daemon's base URL (its http.listen; https:// when it has [http.tls]).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A bearer token with scope `ingest`, when the daemon has [[http.token]] entries
    /// (docs/security.md). Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "IOTFWD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also print each matched rule's output; --verbose false leaves the outputs out.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verbose: bool,
    /// For an https:// --url: the PEM file of the CA to trust (default: the system's root
    /// certificates).
    #[arg(long, env = "IOTFWD_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
}

/// `iotfwd consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The consumer group: the id of a `[[group]]` of the daemon's config.
    #[arg(long)]
    pub group: String,
    /// The AMQP 1.0 endpoint (the daemon's subscription.listen); amqps:// for TLS.
    #[arg(long, default_value = "amqp://127.0.0.1:5673")]
    pub url: String,
    /// The daemon's config, to find the group's AccessKey id and secret (default: the
    /// embedded default, whose `demo` group's secret is in data/demo-group.secret).
    #[arg(long, short, env = "IOTFWD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The AccessKey id (default: the group's, from the config).
    #[arg(long)]
    pub access_key_id: Option<String>,
    /// The AccessKey secret (default: the group's, from the config).
    #[arg(long, env = "IOTFWD_GROUP_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Release each message instead of accepting it (it is redelivered: 9651).
    #[arg(long, conflicts_with_all = ["reject", "no_ack"])]
    pub release: bool,
    /// Reject each message (9652: to the rule's error action, never redelivered).
    #[arg(long, conflicts_with = "no_ack")]
    pub reject: bool,
    /// Settle nothing (after the group's ack_timeout_ms each is 9650 and redelivered).
    #[arg(long)]
    pub no_ack: bool,
    /// Stop after this many messages (default: run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// How the login is signed: hmacsha1 or hmacsha256.
    #[arg(long, default_value = "hmacsha1")]
    pub sign_method: String,
    /// The idle time-out to announce, ms (30000..=300000 is accepted).
    #[arg(long, default_value_t = 60_000)]
    pub idle_timeout_ms: u32,
    /// The client id (default: `iotfwd-consume-<pid>`).
    #[arg(long)]
    pub client_id: Option<String>,
    /// For an amqps:// URL: the PEM file of the CA (or self-signed certificate) to trust
    /// (default: the system's root certificates). `--ca` is an older name.
    #[arg(long, alias = "ca", env = "IOTFWD_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
}

/// `iotfwd rules test`.
#[derive(Debug, Args)]
pub struct RuleTestArgs {
    /// The rule file (TOML; the rule is named by the file's stem).
    pub rule_file: PathBuf,
    /// The message topic, e.g. /a1b2c3/dev01/thing/event/property/post: the device's identity
    /// (productKey, deviceName) comes from it.
    #[arg(long)]
    pub topic: String,
    /// The payload: JSON text, or @FILE to read it from a file.
    #[arg(long, value_name = "JSON|@FILE")]
    pub payload: String,
    /// Message time in ms since the epoch (default: now), for timestamp().
    #[arg(long)]
    pub timestamp: Option<i64>,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run::run(config.as_deref()),
        Command::Consume(args) => consume::run(args),
        Command::Check { config, rules } => check::run(config.as_deref(), rules.as_deref()),
        Command::Rules {
            command: RulesCommand::Test(args),
        } => rules::test(args),
        Command::Codes { code } => codes::run(code),
        Command::Logs(cmd) => logs::run(*cmd),
        Command::Send(args) => send::run(args),
        Command::Dlq(cmd) => dlq::run(cmd),
        Command::Bench { command } => bench::run(command),
    }
}
