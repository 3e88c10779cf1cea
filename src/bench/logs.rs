//! `iotfwd bench logs`: the record store under the issue's targets.
//!
//! 1. The engine's rate on the `bench engine` workload (10 rules, property posts), measured in
//!    the same run: the pipeline's best rate, since every other stage is slower. The insert
//!    target is 3 records per message at that rate.
//! 2. Fill: N records of realistic shape through the real write path (bounded channel, drain
//!    task, writer thread, one transaction per batch), timed from the first send until the last
//!    record is committed. The records come from the daemon's own constructors, for messages
//!    that name their ids and time as an envelope does. Per message: its uplink (the payload as
//!    content), two ruleengine records (one rule without actions, one `to = "amqp"` action, 10%
//!    of them 9325 with the reason), and a ServerSubscribe delivery for every fourth message:
//!    3.25 records per message from 1000 devices of 10 products, spread over the last 24 hours.
//! 3. The console's lookups on the filled store, through the same reader `iotfwd logs` uses:
//!    by messageId, by traceId, by device over the last hour, and `logs trace`; 25 random
//!    lookups each, median and slowest.
//! 4. A keyword scan that matches nothing, so it reads every record: the worst case.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::message::{Identity, Message};
use crate::outcome::query::{LogParams, LogQuery};
use crate::outcome::store::{Reader, Store, StoreOptions, WriterStats};
use crate::outcome::{Failure, GroupOutcome, Record};

const DEVICES: u64 = 1000;
const PRODUCTS: u64 = 10;
/// The fill spans this much time, ending now.
const SPAN_MS: i64 = 24 * 3600 * 1000;

/// splitmix64: a pure function of `i`, so any message's ids can be regenerated.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `--random-trace-ids`: trace ids with no time order, as envelopes may bring them.
static RANDOM_TRACE_IDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The synthetic message `i` of `n`.
struct Msg {
    i: u64,
    time_ms: i64,
    device: u64,
}

impl Msg {
    fn new(i: u64, n: u64, end_ms: i64) -> Msg {
        Msg {
            i,
            time_ms: end_ms - SPAN_MS + (i as i128 * SPAN_MS as i128 / n.max(1) as i128) as i64,
            device: mix(i) % DEVICES,
        }
    }
    fn message_id(&self) -> String {
        format!("{:019}", 1_882_975_926_703_095_808u64 + self.i)
    }
    /// Shaped like the daemon's generated ids ([`crate::message::new_trace_id`]): the
    /// message time, then random bits.
    fn trace_id(&self) -> String {
        if RANDOM_TRACE_IDS.load(std::sync::atomic::Ordering::Relaxed) {
            return format!("{:016x}{:016x}", mix(self.i ^ 0xA5A5), mix(self.i ^ 0x5A5A));
        }
        let random = ((mix(self.i ^ 0xA5A5) as u128) << 16
            | (mix(self.i ^ 0x5A5A) as u128 & 0xFFFF))
            & ((1u128 << 80) - 1);
        format!(
            "{:012x}{random:020x}",
            self.time_ms as u64 & 0xFFFF_FFFF_FFFF
        )
    }
    fn device_name(&self) -> String {
        format!("dev{:04}", self.device)
    }
    fn product_key(&self) -> String {
        format!("pk{:02}a7Hx", self.device % PRODUCTS)
    }

    /// The message's temperature and humidity.
    fn reading(&self) -> (f64, u64) {
        let r = mix(self.i ^ 0xFEED);
        (15.0 + (r % 300) as f64 / 10.0, 30 + (r >> 12) % 60)
    }

    /// The message as a source takes it in: the envelope names its ids, time, tenant and
    /// instance, so the records of message `i` can be found again by regenerating them.
    fn message(&self) -> Message {
        let (temperature, humidity) = self.reading();
        let payload = format!(
            r#"{{"id":"{}","version":"1.0","items":{{"temperature":{{"value":{temperature:.1},"time":{}}},"humidity":{{"value":{humidity},"time":{}}}}},"method":"thing.event.property.post"}}"#,
            self.i, self.time_ms, self.time_ms
        );
        Message::new(
            format!(
                "/{}/{}/thing/event/property/post",
                self.product_key(),
                self.device_name()
            ),
            payload.into_bytes().into(),
            Identity {
                message_id: Some(self.message_id()),
                trace_id: Some(self.trace_id()),
                timestamp_ms: Some(self.time_ms),
                tenant_id: Some("tenant-1".into()),
                instance_id: Some("iot-instance-1".into()),
                ..Identity::default()
            },
        )
        .expect("generated topics are valid")
    }

    /// This message's records, in the order the daemon writes them, built by the daemon's own
    /// record constructors and dated at the message's time.
    fn records(&self) -> Vec<Record> {
        let message = self.message();
        let (temperature, humidity) = self.reading();
        let product = self.device % PRODUCTS;
        let output = format!(
            r#"{{"device":"{}","temperature":{temperature:.1},"humidity":{humidity},"ts":{}}}"#,
            self.device_name(),
            self.time_ms
        );
        let overheat = format!("overheat_{product}");
        // One forward in ten finds the broker down, after the action's three attempts.
        let (forwarded, attempts) = if mix(self.i ^ 0xFEED).is_multiple_of(10) {
            let failure = Failure::unreachable(
                "cannot connect to amqp://127.0.0.1:5672: connection refused (os error 111) \
                 (after 3 attempts)",
            );
            (Err(failure), 3)
        } else {
            (Ok(()), 1)
        };
        let mut out = Vec::with_capacity(4);
        out.push(Record::uplink(&message).with_time_ms(self.time_ms));
        out.push(
            Record::rule_output(&message, &format!("archive_{product}"), output.clone())
                .with_time_ms(self.time_ms + 1),
        );
        out.push(
            Record::action(
                &message,
                &overheat,
                "amqp:alerts",
                &forwarded,
                format!(r#"{{"attempts":{attempts},"output":{output}}}"#),
            )
            .with_time_ms(self.time_ms + 2),
        );
        if self.i.is_multiple_of(4) {
            out.push(
                Record::group(
                    &message,
                    "ops-dashboard",
                    "tenant-1",
                    GroupOutcome::Accepted,
                    "dashboard-1",
                    &overheat,
                    output.as_bytes(),
                )
                .with_time_ms(self.time_ms + 3),
            );
        }
        out
    }
}

/// Messages needed for `records` records (3.25 per message on average).
fn messages_for(records: u64) -> u64 {
    (records * 4).div_ceil(13)
}

/// The engine's msg/s on the `bench engine` workload (10 rules), a short run.
fn engine_rate() -> f64 {
    let engine = super::bench_engine(10);
    let messages = super::property_posts(100_000);
    for chunk in messages.chunks(512).take(4) {
        std::hint::black_box(engine.evaluate(chunk));
    }
    let started = Instant::now();
    for chunk in messages.chunks(512) {
        std::hint::black_box(engine.evaluate(chunk));
    }
    messages.len() as f64 / started.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `f` on each input; returns (median, slowest).
fn time_each<T>(inputs: &[T], mut f: impl FnMut(&T) -> usize) -> (Duration, Duration, usize) {
    let mut times = Vec::with_capacity(inputs.len());
    let mut found = 0;
    for input in inputs {
        let started = Instant::now();
        found += f(input);
        times.push(started.elapsed());
    }
    times.sort();
    (
        times[times.len() / 2],
        *times.last().expect("inputs"),
        found,
    )
}

fn query(params: &[(&str, String)]) -> LogQuery {
    LogParams::from_pairs(params.iter().map(|(k, v)| (*k, v.clone())))
        .and_then(|p| p.validate(crate::message::now_ms()))
        .expect("bench queries are valid")
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// `iotfwd bench logs`.
pub fn run(
    records: usize,
    db: Option<PathBuf>,
    keep: bool,
    random_trace_ids: bool,
    options: StoreOptions,
    postgres: Option<String>,
) -> ExitCode {
    RANDOM_TRACE_IDS.store(random_trace_ids, std::sync::atomic::Ordering::Relaxed);
    let records = records.max(1) as u64;
    let temp = db.is_none();
    let path = db.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("iotfwd-bench-logs-{}.db", std::process::id()))
    });
    // An existing --db (kept from an earlier run) is measured as it is, without a fill.
    let reuse = path.exists();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "bench logs: {records} records into {} (transactions of up to {} records, WAL \
         checkpoint every {} MiB)",
        path.display(),
        options.batch_max_records,
        options.checkpoint_mib
    );
    let engine = engine_rate();
    let target_rate = 3.0 * engine;
    println!(
        "engine rate (pipeline's best, bench engine workload, 10 rules): {engine:.0} msg/s -> \
         insert target {target_rate:.0} records/s"
    );

    // Fill through the real write path.
    let n_msgs = messages_for(records);
    let end_ms = crate::message::now_ms();
    let fill_result = runtime.block_on(async {
        if reuse {
            let sent = Reader::open(&path)?.count()?;
            println!(
                "{} exists: measuring its {sent} records, no fill",
                path.display()
            );
            return Ok((sent, None, Default::default()));
        }
        let store = Store::open(&path, options.clone(), None)?;
        fill(store, records, n_msgs, end_ms).await
    });
    let (sent, fill_time, stats) = match fill_result {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = report(
        &path,
        sent,
        fill_time,
        stats,
        n_msgs,
        end_ms,
        target_rate,
        engine,
    );
    if temp && !keep {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    } else {
        println!("store kept at {}", path.display());
    }
    if code != ExitCode::SUCCESS {
        return code;
    }
    let Some(url) = postgres else {
        return code;
    };
    // The same records into PostgreSQL, in the same run.
    println!();
    println!("PostgreSQL store at {url}: the same {records} records");
    let pg = runtime.block_on(async {
        let target = crate::outcome::store::PgTarget::new(&url, None)?;
        let store = Store::open_postgres(target.clone(), options.clone(), None).await?;
        let filled = fill(store, records, n_msgs, end_ms).await?;
        // One retention run, as the daemon makes every retention interval: it also refreshes
        // the planner's statistics of the partitions written to, as after the first interval of
        // a running daemon.
        let store = Store::open_postgres(target.clone(), options, None).await?;
        store.purge_older_than(0).await?;
        store.shutdown().await;
        Ok::<_, crate::outcome::store::StoreError>((filled, target))
    });
    let ((pg_sent, pg_time, pg_stats), target) = match pg {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(t) = pg_time {
        println!(
            "filled {} records ({} transactions, {} failed) in {:.1} s",
            pg_stats.written,
            pg_stats.transactions,
            pg_stats.failed,
            t.as_secs_f64(),
        );
    }
    if let (Some(lite), Some(pgt)) = (fill_time, pg_time) {
        let (a, b) = (
            sent as f64 / lite.as_secs_f64(),
            pg_sent as f64 / pgt.as_secs_f64(),
        );
        println!(
            "sustained insert rate: SQLite {a:.0} records/s, PostgreSQL {b:.0} records/s \
             (PostgreSQL = {:.2} x SQLite, same records, same run)",
            b / a
        );
    }
    let reader = match crate::outcome::store::PgReader::open(target) {
        Ok(r) => Reader::Postgres(r),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    lookups(
        &reader,
        pg_sent,
        pg_time,
        pg_stats,
        n_msgs,
        end_ms,
        target_rate,
        engine,
    )
}

/// Sends `records` records of the workload through `store`'s real write path; the time from
/// the first send until the last record is committed.
async fn fill(
    store: Store,
    records: u64,
    n_msgs: u64,
    end_ms: i64,
) -> Result<(u64, Option<Duration>, WriterStats), crate::outcome::store::StoreError> {
    let tx = store.sender();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut next_report = 1_000_000u64.min(records);
    let mut last = (Instant::now(), 0u64);
    'fill: for i in 0..n_msgs {
        for r in Msg::new(i, n_msgs, end_ms).records() {
            if sent == records {
                break 'fill;
            }
            if tx.send(r).await.is_err() {
                break 'fill;
            }
            sent += 1;
            if sent == next_report {
                let now = Instant::now();
                let rate = (sent - last.1) as f64 / (now - last.0).as_secs_f64();
                println!(
                    "  {sent:>11} records sent, {rate:>9.0} records/s over the last {}",
                    sent - last.1
                );
                last = (now, sent);
                next_report = (sent + 1_000_000).min(records);
            }
        }
    }
    drop(tx);
    store.flush().await?;
    let elapsed = started.elapsed();
    let stats = store.shutdown().await;
    Ok((sent, Some(elapsed), stats))
}

/// The SQLite file's size and the figures of [`lookups`].
#[allow(clippy::too_many_arguments)]
fn report(
    path: &std::path::Path,
    sent: u64,
    fill_time: Option<Duration>,
    stats: WriterStats,
    n_msgs: u64,
    end_ms: i64,
    target_rate: f64,
    engine: f64,
) -> ExitCode {
    let path = path.to_owned();
    let size: u64 = ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            std::fs::metadata(p).ok().map(|m| m.len())
        })
        .sum();
    if let Some(fill_time) = fill_time {
        println!(
            "filled {} records ({} transactions, {} failed) in {:.1} s",
            stats.written,
            stats.transactions,
            stats.failed,
            fill_time.as_secs_f64(),
        );
    }
    println!(
        "file {:.2} GB ({:.0} B/record)",
        size as f64 / 1e9,
        size as f64 / sent.max(1) as f64
    );

    let reader = match Reader::open(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    lookups(
        &reader,
        sent,
        fill_time,
        stats,
        n_msgs,
        end_ms,
        target_rate,
        engine,
    )
}

/// The console's lookups and the keyword scans on a filled store, as a table.
#[allow(clippy::too_many_arguments)]
fn lookups(
    reader: &Reader,
    sent: u64,
    fill_time: Option<Duration>,
    _stats: WriterStats,
    n_msgs: u64,
    end_ms: i64,
    target_rate: f64,
    engine: f64,
) -> ExitCode {
    let insert_rate = fill_time.map(|t| sent as f64 / t.as_secs_f64());
    let msgs_written = n_msgs.min(sent * 4 / 13).max(1);
    let picks: Vec<Msg> = (0..25)
        .map(|k| Msg::new(mix(k * 7919) % msgs_written, n_msgs, end_ms))
        .collect();
    let run_query = |q: &LogQuery| reader.query(q).expect("query").records.len();

    let by_message = time_each(&picks, |m| {
        run_query(&query(&[("messageId", m.message_id())]))
    });
    let by_trace = time_each(&picks, |m| run_query(&query(&[("traceId", m.trace_id())])));
    let by_device = time_each(&picks, |m| {
        run_query(&query(&[
            ("device", m.device_name()),
            ("since", "1h".to_owned()),
        ]))
    });
    let trace = time_each(&picks, |m| {
        reader.trace(&m.message_id()).expect("trace").records.len()
    });
    let scans: Vec<u32> = (0..3).collect();
    let keyword = time_each(&scans, |_| {
        run_query(&query(&[(
            "keyword",
            "no such keyword, (anywhere)".to_owned(),
        )]))
    });
    let keyword_hit = time_each(&scans, |_| {
        run_query(&query(&[("keyword", "os error 111".to_owned())]))
    });

    let lookup_target = Duration::from_millis(50);
    let scan_target = Duration::from_secs(3);
    println!();
    println!("| measure | figure | target | |");
    println!("|---|---|---|---|");
    if let Some(insert_rate) = insert_rate {
        println!(
            "| sustained insert rate ({sent} records) | {insert_rate:.0} records/s | ≥ \
             {target_rate:.0} records/s (3 × {engine:.0} msg/s) | {} |",
            verdict(insert_rate >= target_rate)
        );
    }
    for (name, (median, max, found)) in [
        ("lookup by messageId", by_message),
        ("lookup by traceId", by_trace),
        ("lookup by device, last hour (first page of 50)", by_device),
        ("`logs trace <messageId>`", trace),
    ] {
        println!(
            "| {name} | median {:.2} ms, slowest {:.2} ms ({} records in 25 lookups) | < 50 ms | {} |",
            ms(median),
            ms(max),
            found,
            verdict(max < lookup_target)
        );
    }
    println!(
        "| keyword scan, no match (reads all {sent} records) | median {:.2} s, slowest {:.2} s | < 3 s | {} |",
        keyword.0.as_secs_f64(),
        keyword.1.as_secs_f64(),
        verdict(keyword.1 < scan_target)
    );
    println!(
        "| keyword scan, 10% of messages match (first page of 50) | median {:.2} ms | < 3 s | {} |",
        ms(keyword_hit.0),
        verdict(keyword_hit.1 < scan_target)
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_stable_ids_and_about_3_25_records() {
        let n = 1000;
        let total: usize = (0..n).map(|i| Msg::new(i, n, 0).records().len()).sum();
        assert_eq!(total, 3250);
        let a = Msg::new(7, n, 0);
        let b = Msg::new(7, n, 0);
        assert_eq!(
            (a.message_id(), a.trace_id()),
            (b.message_id(), b.trace_id())
        );
        assert_eq!(a.trace_id().len(), 32);
        assert!(messages_for(3250) >= 1000);
    }
}
