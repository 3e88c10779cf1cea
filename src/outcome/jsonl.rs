//! The records as JSON lines: one object per record, with the platform's field names
//! (`time`, `traceId`, `messageId`, `productKey`, `deviceName`, `bizCode`, `operation`, `code`,
//! `reason`, `content`, `tenantId`, `instanceId`), in that order.
//!
//! The daemon writes them to stdout or a file (`store.jsonl`) so a log shipper (Promtail/Alloy
//! for Loki, Filebeat/Vector for Elasticsearch, Vector for ClickHouse) can take them when one
//! machine is not enough; `iotfwd logs --json` prints the same lines from the store.
//!
//! Like the store, the writer is fed by a bounded channel: a slow disk or a stalled stdout reader
//! slows intake instead of losing lines. A write error is logged (the records are still in the
//! store) and the writer goes on with the next batch. Each batch is written and flushed (handed
//! to the operating system, which keeps it through a crash of the process) before the writer
//! reports it in its [`CommitLog`]: when the JSON lines are the only sink, acknowledgements wait
//! for that (`store.durability = "acked"`).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

use super::Record;
use super::commit::{CommitLog, RecordSender, StopOnDrop};
use crate::config::store::JsonlTarget;

/// One record as one JSON line, without the newline.
pub fn line(record: &Record) -> String {
    serde_json::to_string(record).expect("a record serializes")
}

/// Appends one JSON line per record (each ending in `\n`) to `out`.
pub fn write_lines(out: &mut impl std::io::Write, records: &[Record]) -> std::io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, r).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// The daemon's JSON-lines writer: attach [`JsonlSink::sender`] to
/// [`super::Outcomes::with_sink`].
pub struct JsonlSink {
    sender: RecordSender,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

/// Why the JSON-lines target could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the JSON-lines file {path} (store.jsonl): {source}")]
pub struct JsonlError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl JsonlSink {
    /// Opens the target and starts the writer; `None` for [`JsonlTarget::None`]. A file is
    /// appended to and created if missing; its directory must exist. Must be called inside a
    /// tokio runtime.
    pub async fn open(
        target: &JsonlTarget,
        capacity: usize,
        batch_max: usize,
    ) -> Result<Option<JsonlSink>, JsonlError> {
        let out: Box<dyn AsyncWrite + Send + Unpin> = match target {
            JsonlTarget::None => return Ok(None),
            JsonlTarget::Stdout => Box::new(tokio::io::stdout()),
            JsonlTarget::File(path) => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| JsonlError {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let (sender, records) = mpsc::channel(capacity.max(1));
        let log = Arc::new(CommitLog::default());
        let sender = RecordSender::new(sender, Arc::clone(&log));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(writer(
            records,
            stopped,
            BufWriter::with_capacity(256 * 1024, out),
            batch_max.max(1),
            target.to_string(),
            log,
        ));
        Ok(Some(JsonlSink { sender, stop, task }))
    }

    /// A sender for [`super::Outcomes::with_sink`].
    pub fn sender(&self) -> RecordSender {
        self.sender.clone()
    }

    /// What the writer has written and flushed, for [`super::Outcomes::acked_by`].
    pub fn commit_log(&self) -> Arc<CommitLog> {
        Arc::clone(self.sender.log())
    }

    /// Stops taking records, writes and flushes what is queued; returns the lines written.
    pub async fn shutdown(self) -> u64 {
        drop(self.sender);
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

async fn writer(
    mut records: mpsc::Receiver<Record>,
    mut stop: oneshot::Receiver<()>,
    mut out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    batch_max: usize,
    target: String,
    log: Arc<CommitLog>,
) -> u64 {
    let _stopped = StopOnDrop(Arc::clone(&log));
    let mut written = 0u64;
    let mut batch = Vec::with_capacity(batch_max);
    let mut bytes = Vec::with_capacity(64 * 1024);
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop, if !stopping => {
                records.close();
                stopping = true;
            }
            n = records.recv_many(&mut batch, batch_max) => {
                if n == 0 {
                    break;
                }
                bytes.clear();
                write_lines(&mut bytes, &batch).expect("writing to a Vec");
                let result = async {
                    out.write_all(&bytes).await?;
                    out.flush().await
                }
                .await;
                log.advance(n as u64, result.is_ok());
                match result {
                    Ok(()) => written += n as u64,
                    Err(e) => tracing::error!(
                        jsonl = %target,
                        records = n,
                        "cannot write {n} JSON lines: {e}; the records are in the record store"
                    ),
                }
                batch.clear();
            }
        }
    }
    let _ = out.flush().await;
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{BizCode, Code};

    fn record(i: i64) -> Record {
        Record {
            time_ms: i,
            trace_id: "t".into(),
            message_id: format!("m{i}"),
            product_key: "p".into(),
            device_name: "d".into(),
            biz_code: BizCode::RuleEngine,
            operation: "rule/x/amqp:alerts".into(),
            code: Code::DestinationUnavailable,
            reason: "tab\there, newline\nthere".into(),
            content: "{\"a\":1}".into(),
            tenant_id: String::new(),
            instance_id: String::new(),
        }
    }

    #[test]
    fn one_line_per_record_with_platform_names() {
        let mut out = Vec::new();
        write_lines(&mut out, &[record(0), record(1)]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0],
            "{\"time\":\"1970-01-01T00:00:00.000Z\",\"traceId\":\"t\",\"messageId\":\"m0\",\
             \"productKey\":\"p\",\"deviceName\":\"d\",\"bizCode\":\"ruleengine\",\
             \"operation\":\"rule/x/amqp:alerts\",\"code\":9325,\
             \"reason\":\"tab\\there, newline\\nthere\",\"content\":\"{\\\"a\\\":1}\",\
             \"tenantId\":\"\",\"instanceId\":\"\"}"
        );
        assert_eq!(line(&record(1)), lines[1]);
    }

    #[tokio::test]
    async fn file_sink_appends_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "existing\n").unwrap();
        let sink = JsonlSink::open(&JsonlTarget::File(path.clone()), 4, 2)
            .await
            .unwrap()
            .unwrap();
        let tx = sink.sender();
        for i in 0..10 {
            tx.send(record(i)).await.unwrap();
        }
        // A sender still alive does not keep shutdown from draining.
        assert_eq!(sink.shutdown().await, 10);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 11);
        assert!(text.starts_with("existing\n{\"time\""));
        assert!(tx.send(record(99)).await.is_err(), "closed after shutdown");
        assert!(
            JsonlSink::open(&JsonlTarget::None, 1, 1)
                .await
                .unwrap()
                .is_none()
        );
        let e = JsonlSink::open(
            &JsonlTarget::File(dir.path().join("no/such/dir.jsonl")),
            1,
            1,
        )
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("store.jsonl"), "{e}");
    }
}
