//! `iotfwd dlq`: the dead-letter queue of a running daemon, through its API
//! (`GET /api/v1/dlq`, `POST /api/v1/dlq/replay`; docs/dead-letters.md).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::support::{Runtime, block_on};
use crate::client::http;
use crate::text::{cut, escape_controls};
use hyper::Method;

/// `iotfwd dlq`.
#[derive(Debug, Args)]
pub struct DlqCmd {
    #[command(subcommand)]
    pub command: DlqSub,
}

#[derive(Debug, Subcommand)]
pub enum DlqSub {
    /// List the dead letters, oldest first: when, rule, destination, code, reason, the
    /// message's ids and topic (--json: one JSON object per line, with the payload).
    ///
    /// Exit status: 0, also when the queue is empty; 1 when the daemon cannot be reached or
    /// answers with an error (a bad filter says which).
    List {
        #[command(flatten)]
        filters: DlqFilters,
        /// Only those dead-lettered within this duration back from now: 30s, 15m, 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replay the dead letters, oldest first, after the cause was fixed: each runs through the
    /// pipeline again under its original message id and trace id, for the rule and
    /// destination that failed (a consumer group's is handed to its group again). One that is
    /// delivered leaves the queue; one that fails again stays, with its new failure.
    ///
    /// Prints one line per dead letter and a summary. Exit status: 0 when every replayed one
    /// was delivered; 1 when one failed again, or the daemon cannot be reached or answers with
    /// an error.
    Replay {
        #[command(flatten)]
        filters: DlqFilters,
    },
}

/// The filters both subcommands take, and where the daemon is.
#[derive(Debug, Args)]
pub struct DlqFilters {
    /// Only this rule's dead letters.
    #[arg(long)]
    pub rule: Option<String>,
    /// Only those that failed with this code (e.g. 9332).
    #[arg(long)]
    pub code: Option<u16>,
    /// At most this many (1..=10000).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// The daemon's base URL (its http.listen; https:// when it has [http.tls]).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// For an https:// --url: the PEM file of the CA to trust (default: the system's root
    /// certificates).
    #[arg(long, env = "IOTFWD_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A bearer token (scope `read` to list, `admin` to replay) when the daemon has
    /// [[http.token]] entries. Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "IOTFWD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl DlqFilters {
    fn query(&self, since: Option<&str>) -> Vec<(&'static str, String)> {
        let mut q = vec![("limit", self.limit.to_string())];
        if let Some(r) = &self.rule {
            q.push(("rule", r.clone()));
        }
        if let Some(c) = self.code {
            q.push(("code", c.to_string()));
        }
        if let Some(s) = since {
            q.push(("since", s.to_owned()));
        }
        q
    }
}

pub(super) fn run(cmd: DlqCmd) -> ExitCode {
    block_on(Runtime::CurrentThread, async move {
        match cmd.command {
            DlqSub::List {
                filters,
                since,
                json,
            } => {
                let endpoint = format!("{}/api/v1/dlq", filters.url.trim_end_matches('/'));
                let url = match with_query(&endpoint, &filters.query(since.as_deref())) {
                    Ok(u) => u,
                    Err(code) => return code,
                };
                let answer = call(Method::GET, &url, &filters).await;
                match answer {
                    Ok(v) => {
                        print_list(&v, json);
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&endpoint, &e),
                }
            }
            DlqSub::Replay { filters } => {
                let endpoint = format!("{}/api/v1/dlq/replay", filters.url.trim_end_matches('/'));
                let url = match with_query(&endpoint, &filters.query(None)) {
                    Ok(u) => u,
                    Err(code) => return code,
                };
                let answer = call(Method::POST, &url, &filters).await;
                match answer {
                    Ok(v) => print_replay(&v),
                    Err(e) => fail(&endpoint, &e),
                }
            }
        }
    })
}

/// `endpoint` with the filters as its query string; a --url that is not a URL is exit 2.
fn with_query(endpoint: &str, query: &[(&str, String)]) -> Result<url::Url, ExitCode> {
    url::Url::parse_with_params(endpoint, query).map_err(|e| {
        eprintln!("error: --url: {endpoint} is not a URL: {e}");
        ExitCode::from(2)
    })
}

fn fail(endpoint: &str, e: &str) -> ExitCode {
    eprintln!("error: {endpoint}: {e}");
    ExitCode::FAILURE
}

/// Sends the request; the answer as JSON, or what went wrong (the daemon's `error` text for
/// an error status).
async fn call(method: Method, url: &url::Url, filters: &DlqFilters) -> Result<Value, String> {
    let (status, text) = http::call(http::Call {
        method,
        url,
        json: None,
        token: filters.token.as_deref(),
        ca_file: filters.ca_file.as_deref(),
    })
    .await
    .map_err(|e| format!("cannot reach the daemon: {e:#}"))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        Ok(value)
    } else {
        let why = value["error"]
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        Err(format!("the daemon answered {status}: {why}"))
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => escape_controls(s),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn print_list(answer: &Value, json: bool) {
    let empty = Vec::new();
    let letters = answer["deadLetters"].as_array().unwrap_or(&empty);
    if json {
        for d in letters {
            println!("{d}");
        }
        return;
    }
    println!(
        "{:<6} {:<24} {:<16} {:<24} {:<5} {:<8} {:<34} {:<24} REASON",
        "ID", "TIME", "RULE", "DESTINATION", "CODE", "REPLAYS", "MESSAGE ID", "TOPIC"
    );
    for d in letters {
        println!(
            "{:<6} {:<24} {:<16} {:<24} {:<5} {:<8} {:<34} {:<24} {}",
            text(&d["id"]),
            text(&d["time"]),
            cut(&text(&d["rule"]), 16),
            cut(&text(&d["destination"]), 24),
            text(&d["code"]),
            text(&d["replays"]),
            cut(&text(&d["messageId"]), 34),
            cut(&text(&d["topic"]), 24),
            cut(&text(&d["reason"]), 160),
        );
    }
    eprintln!(
        "{} dead letter(s) in {}",
        letters.len(),
        text(&answer["queue"])
    );
}

fn print_replay(answer: &Value) -> ExitCode {
    let empty = Vec::new();
    for r in answer["results"].as_array().unwrap_or(&empty) {
        let reason = match r["reason"].as_str() {
            Some(why) => format!(" {} {}", text(&r["code"]), cut(&escape_controls(why), 160)),
            None => String::new(),
        };
        println!(
            "{:<9} {} rule {} {} (trace {}){reason}",
            text(&r["result"]),
            text(&r["messageId"]),
            text(&r["rule"]),
            text(&r["destination"]),
            text(&r["traceId"]),
        );
    }
    let failed = answer["failed"].as_u64().unwrap_or(0);
    eprintln!(
        "replayed {}: {} delivered (left the queue), {failed} failed again (kept in {})",
        text(&answer["replayed"]),
        text(&answer["delivered"]),
        text(&answer["queue"]),
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
