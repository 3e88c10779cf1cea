//! `iotfwd logs` and `iotfwd logs trace`: the console's log queries, read straight from the
//! record store file (the daemon need not run).
//!
//! The filters are validated by [`LogParams::validate`], the same code `GET /api/v1/logs` uses,
//! so both give the same results and the same error messages. The table shows each failure's
//! code with its one-line meaning from the catalog; `--json` prints JSON lines with the
//! platform's field names. Hints (the next page's cursor, "no records") go to stderr so stdout
//! stays clean for pipes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::outcome::Record;
use crate::outcome::jsonl;
use crate::outcome::query::{LogParams, LogQuery, format_time_ms};
use crate::outcome::store::{Reader, StoreError};
use crate::text::{cut, escape_controls};

/// `iotfwd logs`: query the outcome records.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LogsCmd {
    #[command(subcommand)]
    pub command: Option<LogsSub>,
    #[command(flatten)]
    pub filters: Filters,
    #[command(flatten)]
    pub source: StoreSource,
    /// Print JSON lines (the platform's field names) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum LogsSub {
    /// The whole path of one message in time order (uplink, each rule action, each delivery),
    /// each failure with its meaning and troubleshooting from the code catalog.
    Trace {
        /// A messageId or a traceId.
        id: String,
        #[command(flatten)]
        source: StoreSource,
        /// Print the records as JSON lines instead.
        #[arg(long)]
        json: bool,
    },
}

/// Which store file to read.
#[derive(Debug, Args)]
pub struct StoreSource {
    /// The daemon's config file: its store.path (default <data.dir>/outcomes.db) is read.
    /// Without --config and --db, the embedded default: ./data/outcomes.db.
    #[arg(long, short, env = "IOTFWD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The record store file itself (wins over --config).
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
}

/// The filters; every one is optional and they combine with AND.
#[derive(Debug, Args)]
pub struct Filters {
    /// Device name (exact).
    #[arg(long, value_name = "NAME")]
    pub device: Option<String>,
    /// Product key (exact).
    #[arg(long, value_name = "PK")]
    pub product: Option<String>,
    /// Trace id (exact).
    #[arg(long, value_name = "ID")]
    pub trace_id: Option<String>,
    /// Message id (exact).
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// A literal, case-sensitive substring of operation, reason or content. Any character
    /// works, including , '";=()[]{}?@&<>/: tabs and newlines.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub keyword: Option<String>,
    /// success (code 200), failed (any other code) or a code such as 9325.
    #[arg(long, value_name = "success|failed|CODE")]
    pub status: Option<String>,
    /// uplink, ruleengine or ServerSubscribe.
    #[arg(long, value_name = "TYPE")]
    pub service_type: Option<String>,
    /// Only the last DURATION: 30s, 15m, 1h, 7d, 2w.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// From this time on (RFC 3339, inclusive), e.g. 2026-11-27T02:00:00Z.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Up to this time (RFC 3339, inclusive).
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Records per page, 1..=1000 (default 50); newest first.
    #[arg(long, value_name = "N")]
    pub limit: Option<String>,
    /// Continue with the page after the one that printed this cursor.
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,
}

impl Filters {
    fn params(self) -> LogParams {
        LogParams {
            device: self.device,
            product: self.product,
            trace_id: self.trace_id,
            message_id: self.message_id,
            keyword: self.keyword,
            status: self.status,
            service_type: self.service_type,
            since: self.since,
            from: self.from,
            to: self.to,
            limit: self.limit,
            cursor: self.cursor,
        }
    }
}

/// Runs `iotfwd logs ...`.
pub fn run(cmd: LogsCmd) -> ExitCode {
    match cmd.command {
        Some(LogsSub::Trace { id, source, json }) => trace(&id, &source, json),
        None => list(cmd.filters.params(), &cmd.source, cmd.json),
    }
}

/// The store: --db (a SQLite file), else the config's `[store]` (its SQLite file, or its
/// PostgreSQL database with `backend = "postgres"`).
fn open(source: &StoreSource) -> Result<Reader, ExitCode> {
    let failed = |e: StoreError| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    if let Some(db) = &source.db {
        return Reader::open(db).map_err(failed);
    }
    let config = match &source.config {
        None => Config::default(),
        Some(p) => Config::load(p).map_err(|errors| {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} problem(s) in the config", errors.len());
            ExitCode::from(2)
        })?,
    };
    if !config.store.enabled {
        eprintln!(
            "note: the record store is disabled in this config (store.enabled = false); reading \
             what an earlier run left"
        );
    }
    Reader::open_config(&config.store, &config.data.dir).map_err(failed)
}

fn store_error(e: StoreError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

fn list(params: LogParams, source: &StoreSource, json: bool) -> ExitCode {
    let query = match params.validate(crate::message::now_ms()) {
        Ok(q) => q,
        Err(e) => {
            for p in &e.problems {
                eprintln!("error: {p}");
            }
            return ExitCode::from(2);
        }
    };
    let reader = match open(source) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let page = match reader.query(&query) {
        Ok(p) => p,
        Err(e) => return store_error(e),
    };
    let mut out = std::io::stdout().lock();
    let written = if json {
        jsonl::write_lines(&mut out, &page.records)
    } else if page.records.is_empty() {
        Ok(())
    } else {
        use std::io::Write as _;
        out.write_all(render_table(&page.records).as_bytes())
    };
    if let Err(e) = written {
        // A closed pipe (`| head`) is not an error worth a message.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write the output: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    if page.records.is_empty() {
        eprintln!("no records match{}", describe(&query));
    }
    if let Some(cursor) = page.next_cursor {
        eprintln!(
            "{} records shown, newest first; more: repeat the command with --cursor {cursor}",
            page.records.len()
        );
    }
    ExitCode::SUCCESS
}

/// " (in the last hour, ...)": what an empty result was filtered by, so "nothing" is not
/// mistaken for "nothing happened".
fn describe(q: &LogQuery) -> String {
    let mut parts = Vec::new();
    if let Some(f) = q.from_ms {
        parts.push(format!("from {}", format_time_ms(f)));
    }
    if let Some(t) = q.to_ms {
        parts.push(format!("to {}", format_time_ms(t)));
    }
    if q.is_unfiltered() {
        parts.push("the store is empty".to_owned());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

fn trace(id: &str, source: &StoreSource, json: bool) -> ExitCode {
    if id.is_empty() {
        eprintln!("error: give a messageId or traceId");
        return ExitCode::from(2);
    }
    let reader = match open(source) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let trace = match reader.trace(id) {
        Ok(t) => t,
        Err(e) => return store_error(e),
    };
    if trace.records.is_empty() {
        eprintln!(
            "no records with messageId or traceId {id:?} in {}; check the id, and note that \
             records older than store.retention_days are deleted",
            reader.location()
        );
        return ExitCode::FAILURE;
    }
    let text = if json {
        let mut out = Vec::new();
        jsonl::write_lines(&mut out, &trace.records).expect("writing to a Vec");
        String::from_utf8(out).expect("JSON is UTF-8")
    } else {
        render_trace(&trace.records)
    };
    print!("{text}");
    if trace.truncated {
        eprintln!(
            "only the first {} records are shown",
            crate::outcome::store::TRACE_MAX_RECORDS
        );
    }
    ExitCode::SUCCESS
}

/// The table of `iotfwd logs`: one line per record, newest first as given. DETAIL is the code's
/// meaning and the reason for a failure, the content for a success.
pub fn render_table(records: &[Record]) -> String {
    let headers = [
        "TIME",
        "SERVICE",
        "CODE",
        "DEVICE",
        "OPERATION",
        "MESSAGE ID",
        "DETAIL",
    ];
    let caps = [24, 15, 5, 24, 40, 24, 160];
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            let detail = if r.code.is_success() {
                r.content.clone()
            } else if r.reason.is_empty() {
                r.code.info().meaning.to_owned()
            } else {
                format!("{} {}", r.code.info().meaning, r.reason)
            };
            let cells = [
                r.time_rfc3339(),
                r.biz_code.to_string(),
                r.code.to_string(),
                r.device_name.clone(),
                r.operation.clone(),
                r.message_id.clone(),
                detail,
            ];
            std::array::from_fn(|i| cut(&escape_controls(&cells[i]), caps[i]))
        })
        .collect();
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&headers);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// The text of `iotfwd logs trace`: a header, every step in time order, and a verdict. Each
/// failure carries its meaning, reason and troubleshooting from the catalog.
pub fn render_trace(records: &[Record]) -> String {
    let first = &records[0];
    let mut message_ids: Vec<&str> = records.iter().map(|r| r.message_id.as_str()).collect();
    message_ids.dedup();
    let mut trace_ids: Vec<&str> = records.iter().map(|r| r.trace_id.as_str()).collect();
    trace_ids.sort_unstable();
    trace_ids.dedup();
    let failed = records.iter().filter(|r| !r.code.is_success()).count();
    let mut out = format!(
        "message {}  trace {}  device {}/{}\n",
        message_ids.join(","),
        trace_ids.join(","),
        first.product_key,
        first.device_name
    );
    out.push_str(&format!("{} step(s), {} failed\n\n", records.len(), failed));
    for r in records {
        out.push_str(&format!(
            "{}  {:<15}  {:<5}  {}\n",
            r.time_rfc3339(),
            r.biz_code.as_str(),
            r.code.as_u16(),
            escape_controls(&r.operation)
        ));
        if r.code.is_success() {
            // A step that went through may still say something (a replay, a dead letter).
            if !r.reason.is_empty() {
                wrap_into(
                    &mut out,
                    &format!("note: {}", cut(&escape_controls(&r.reason), 300)),
                );
            }
            if !r.content.is_empty() {
                wrap_into(
                    &mut out,
                    &format!("content: {}", cut(&escape_controls(&r.content), 300)),
                );
            }
        } else {
            let info = r.code.info();
            wrap_into(
                &mut out,
                &format!("{} {}: {}", r.code, info.name, info.meaning),
            );
            if !r.reason.is_empty() {
                wrap_into(&mut out, &format!("reason: {}", escape_controls(&r.reason)));
            }
            wrap_into(
                &mut out,
                &format!("troubleshooting: {}", info.troubleshooting),
            );
        }
    }
    out.push('\n');
    let verdict = crate::outcome::trace::verdict(records);
    let line = format!("verdict: {}", verdict.summary);
    if verdict.status == "not_forwarded" {
        wrap_into(&mut out, &line);
    } else {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Appends `text` wrapped at 100 columns, indented by 4.
fn wrap_into(out: &mut String, text: &str) {
    crate::text::wrap_into(out, text, "    ", 100);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Code;

    use crate::message::{Identity, Message};
    use crate::outcome::Failure;

    fn message(payload: &str) -> Message {
        Message::new(
            "/p1/dev1/post".into(),
            payload.as_bytes().to_vec().into(),
            Identity {
                message_id: Some("m-1".into()),
                trace_id: Some("tr-1".into()),
                ..Identity::default()
            },
        )
        .unwrap()
    }

    fn uplink(payload: &str) -> Record {
        Record::uplink(&message(payload))
    }

    fn rule_ok(rule: &str) -> Record {
        Record::rule_output(&message("{}"), rule, "{\"t\":1}".into())
    }

    /// `bad/amqp:alerts` failed with 9325, reason "no broker".
    fn action_failed() -> Record {
        Record::action(
            &message("{}"),
            "bad",
            "amqp:alerts",
            &Err(Failure::unreachable("no broker")),
            "{}".into(),
        )
    }

    #[test]
    fn table_shows_meaning_of_failures_and_escapes_controls() {
        let t = render_table(&[action_failed(), uplink("a\tb\nc")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("TIME  "), "{t}");
        assert!(
            lines[1].contains(&format!(
                "{} no broker",
                Code::DestinationUnavailable.info().meaning
            )),
            "{t}"
        );
        assert!(lines[2].ends_with("a\\tb\\nc"), "{t}");
        let detail = lines[0].find("DETAIL").unwrap();
        assert_eq!(lines[2].chars().nth(detail), Some('a'), "{t}");
    }

    #[test]
    fn trace_has_troubleshooting_and_a_verdict() {
        let t = render_trace(&[uplink("{\"t\":1}"), rule_ok("fine"), action_failed()]);
        let flat = t.split_whitespace().collect::<Vec<_>>().join(" ");
        let info = Code::DestinationUnavailable.info();
        for text in [info.meaning, info.troubleshooting] {
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(flat.contains(&text), "{t}");
        }
        assert!(t.starts_with("message m-1  trace tr-1  device p1/dev1\n3 step(s), 1 failed\n"));
        assert!(
            t.contains("verdict: 1 step(s) failed: bad/amqp:alerts 9325"),
            "{t}"
        );
        let only = render_trace(&[uplink("")]);
        assert!(only.contains("no rule forwarded it"), "{only}");
        assert!(only.contains("iotfwd rules test"), "{only}");
    }
}
