//! The dead-letter queue in the spool: forwards that failed for good, with their original
//! payload and envelope, until an operator replays them (`iotfwd dlq`).

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use super::{Spool, SpoolError};
use crate::message::Message;
use crate::outcome::{Code, format_time_ms};

/// Where a dead letter came from, which decides how it is replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A rule's action failed for good: the payload is the device's, and a replay runs the
    /// message through the pipeline again for that rule and action.
    Rule,
    /// A consumer-group delivery was rejected or redelivered too often: the payload is the
    /// rule's output, and a replay hands it to the group again.
    Group,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Rule => "rule",
            Origin::Group => "group",
        }
    }

    pub fn parse(s: &str) -> Option<Origin> {
        match s {
            "rule" => Some(Origin::Rule),
            "group" => Some(Origin::Group),
            _ => None,
        }
    }
}

/// One dead letter: the message as it came (envelope and payload) and why it is here.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// Its id in the queue (0 before it is stored).
    pub id: i64,
    /// When it was dead-lettered, ms since the epoch.
    pub time_ms: i64,
    pub origin: Origin,
    pub rule: String,
    /// The destination that failed: `amqp:<exchange>`, `group:<id>`.
    pub destination: String,
    /// The last failure's code and reason, and how many attempts it had.
    pub code: Code,
    pub reason: String,
    pub attempts: u32,
    /// How many times it was replayed and failed again.
    pub replays: u32,
    pub topic: String,
    pub product_key: String,
    pub device_name: String,
    pub message_id: String,
    pub trace_id: String,
    pub tenant_id: String,
    pub instance_id: String,
    /// The message's own time, ms since the epoch.
    pub message_time_ms: i64,
    pub payload: Bytes,
}

impl DeadLetter {
    /// A dead letter of `message`, whose `rule` failed at `destination` for good.
    pub fn of_message(
        message: &Message,
        origin: Origin,
        rule: &str,
        destination: &str,
        code: Code,
        reason: &str,
        attempts: u32,
    ) -> DeadLetter {
        DeadLetter {
            id: 0,
            time_ms: crate::message::now_ms(),
            origin,
            rule: rule.to_owned(),
            destination: destination.to_owned(),
            code,
            reason: reason.to_owned(),
            attempts,
            replays: 0,
            topic: message.topic.clone(),
            product_key: message.product_key.clone(),
            device_name: message.device_name.clone(),
            message_id: message.message_id.clone(),
            trace_id: message.trace_id.clone(),
            tenant_id: message.tenant_id.clone().unwrap_or_default(),
            instance_id: message.instance_id.clone().unwrap_or_default(),
            message_time_ms: message.timestamp_ms,
            payload: message.payload.clone(),
        }
    }

    /// The message it holds, under its original ids (for a replay).
    pub fn to_message(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            product_key: self.product_key.clone(),
            device_name: self.device_name.clone(),
            message_id: self.message_id.clone(),
            trace_id: self.trace_id.clone(),
            tenant_id: (!self.tenant_id.is_empty()).then(|| self.tenant_id.clone()),
            instance_id: (!self.instance_id.is_empty()).then(|| self.instance_id.clone()),
            timestamp_ms: self.message_time_ms,
            received_at: std::time::Instant::now(),
            payload: self.payload.clone(),
        }
    }

    /// As the API and `iotfwd dlq list --json` show it: the payload as text when it is UTF-8
    /// (`payload`), else base64 (`payloadBase64`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "time": format_time_ms(self.time_ms),
            "origin": self.origin,
            "rule": self.rule,
            "destination": self.destination,
            "code": self.code,
            "meaning": self.code.info().meaning,
            "reason": self.reason,
            "attempts": self.attempts,
            "replays": self.replays,
            "topic": self.topic,
            "productKey": self.product_key,
            "deviceName": self.device_name,
            "messageId": self.message_id,
            "traceId": self.trace_id,
            "tenantId": self.tenant_id,
            "instanceId": self.instance_id,
            "messageTime": format_time_ms(self.message_time_ms),
        });
        match std::str::from_utf8(&self.payload) {
            Ok(text) => v["payload"] = Value::String(text.to_owned()),
            Err(_) => {
                v["payloadBase64"] =
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&self.payload))
            }
        }
        v
    }
}

/// Which dead letters to list or replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub rule: Option<String>,
    pub code: Option<Code>,
    /// Only those dead-lettered at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Most entries, oldest first.
    pub limit: usize,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.rule.as_ref().is_none_or(|r| *r == d.rule)
            && self.code.is_none_or(|c| c == d.code)
            && self.since_ms.is_none_or(|s| d.time_ms >= s)
    }
}

const COLUMNS: &str = "id, time_ms, origin, rule, destination, code, reason, attempts, replays, \
    topic, product_key, device_name, message_id, trace_id, tenant_id, instance_id, \
    message_time, payload";

impl Spool {
    /// Stores a dead letter; returns its id once the insert is committed (durable).
    pub async fn put_dead_letter(&self, d: DeadLetter) -> Result<i64, SpoolError> {
        use rusqlite::types::Value as V;
        self.write(
            "INSERT INTO dead_letters (time_ms, origin, rule, destination, code, reason, \
             attempts, replays, topic, product_key, device_name, message_id, trace_id, \
             tenant_id, instance_id, message_time, payload) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            vec![
                V::Integer(d.time_ms),
                V::Text(d.origin.as_str().into()),
                V::Text(d.rule),
                V::Text(d.destination),
                V::Integer(i64::from(d.code.as_u16())),
                V::Text(d.reason),
                V::Integer(i64::from(d.attempts)),
                V::Integer(i64::from(d.replays)),
                V::Text(d.topic),
                V::Text(d.product_key),
                V::Text(d.device_name),
                V::Text(d.message_id),
                V::Text(d.trace_id),
                V::Text(d.tenant_id),
                V::Text(d.instance_id),
                V::Integer(d.message_time_ms),
                V::Blob(d.payload.to_vec()),
            ],
        )
        .await
    }

    /// Dead letters matching `filter`, oldest first.
    pub async fn dead_letters(&self, filter: Filter) -> Result<Vec<DeadLetter>, SpoolError> {
        self.read(move |spool, conn| {
            let mut sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(rule) = &filter.rule {
                sql.push_str(" AND rule = ?");
                args.push(rule.clone().into());
            }
            if let Some(code) = filter.code {
                sql.push_str(" AND code = ?");
                args.push(i64::from(code.as_u16()).into());
            }
            if let Some(since) = filter.since_ms {
                sql.push_str(" AND time_ms >= ?");
                args.push(since.into());
            }
            sql.push_str(" ORDER BY id LIMIT ?");
            args.push((filter.limit.min(i64::MAX as usize) as i64).into());
            let mut stmt = conn.prepare(&sql).map_err(|e| spool.sqlite(e))?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), row_to_dead_letter)
                .map_err(|e| spool.sqlite(e))?;
            let mut out = Vec::new();
            for row in rows {
                let d = row.map_err(|e| spool.sqlite(e))?;
                out.push(d.map_err(|what| SpoolError::Corrupt {
                    path: spool.path().to_owned(),
                    what,
                })?);
            }
            Ok(out)
        })
        .await
    }

    /// Removes dead letter `id` once its replay went through; waits for the commit.
    pub async fn remove_dead_letter(&self, id: i64) -> Result<(), SpoolError> {
        self.write("DELETE FROM dead_letters WHERE id = ?1", vec![id.into()])
            .await
            .map(|_| ())
    }

    /// Dead letter `id` was replayed and failed again: it stays, with the new failure, one
    /// more replay counted and the time of this failure. Waits for the commit.
    pub async fn dead_letter_failed_again(
        &self,
        id: i64,
        code: Code,
        reason: &str,
        attempts: u32,
    ) -> Result<(), SpoolError> {
        self.write(
            "UPDATE dead_letters SET code = ?2, reason = ?3, attempts = ?4, \
             replays = replays + 1, time_ms = ?5 WHERE id = ?1",
            vec![
                id.into(),
                i64::from(code.as_u16()).into(),
                reason.to_owned().into(),
                i64::from(attempts).into(),
                crate::message::now_ms().into(),
            ],
        )
        .await
        .map(|_| ())
    }

    /// How many dead letters wait.
    pub async fn dead_letter_count(&self) -> Result<u64, SpoolError> {
        self.read(|spool, conn| {
            conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| spool.sqlite(e))
        })
        .await
    }
}

type Row = Result<DeadLetter, String>;

fn row_to_dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let id: i64 = r.get(0)?;
    let origin: String = r.get(2)?;
    let code: i64 = r.get(5)?;
    let payload: Vec<u8> = r.get(17)?;
    let Some(origin) = Origin::parse(&origin) else {
        return Ok(Err(format!("dead letter {id} has origin {origin:?}")));
    };
    let Some(code) = u16::try_from(code).ok().and_then(Code::from_u16) else {
        return Ok(Err(format!("dead letter {id} has code {code}")));
    };
    Ok(Ok(DeadLetter {
        id,
        time_ms: r.get(1)?,
        origin,
        rule: r.get(3)?,
        destination: r.get(4)?,
        code,
        reason: r.get(6)?,
        attempts: r.get(7)?,
        replays: r.get(8)?,
        topic: r.get(9)?,
        product_key: r.get(10)?,
        device_name: r.get(11)?,
        message_id: r.get(12)?,
        trace_id: r.get(13)?,
        tenant_id: r.get(14)?,
        instance_id: r.get(15)?,
        message_time_ms: r.get(16)?,
        payload: Bytes::from(payload),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Identity;

    fn message(n: u32) -> Message {
        Message::new(
            "/pk/dev/post".into(),
            format!("{{\"n\":{n}}}").into_bytes().into(),
            Identity {
                message_id: Some(format!("m{n}")),
                trace_id: Some(format!("t{n}")),
                tenant_id: Some("acme".into()),
                ..Identity::default()
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn dead_letters_survive_reopening_and_filter_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = Spool::path_in(dir.path());
        let spool = Spool::open(&path).unwrap();
        for (n, rule, code) in [
            (1, "a", Code::DestinationUnavailable),
            (2, "b", Code::DestinationMisconfigured),
            (3, "a", Code::DestinationMisconfigured),
        ] {
            let d =
                DeadLetter::of_message(&message(n), Origin::Rule, rule, "amqp:x", code, "why", 4);
            spool.put_dead_letter(d).await.unwrap();
        }
        drop(spool);
        let spool = Spool::open(&path).unwrap();
        assert_eq!(spool.dead_letter_count().await.unwrap(), 3);
        let all = |f: Filter| {
            let spool = spool.clone();
            async move {
                spool
                    .dead_letters(Filter { limit: 100, ..f })
                    .await
                    .unwrap()
                    .iter()
                    .map(|d| d.message_id.clone())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(all(Filter::default()).await, ["m1", "m2", "m3"]);
        let rule_a = Filter {
            rule: Some("a".into()),
            ..Filter::default()
        };
        assert_eq!(all(rule_a).await, ["m1", "m3"]);
        let code = Filter {
            code: Some(Code::DestinationMisconfigured),
            ..Filter::default()
        };
        assert_eq!(all(code).await, ["m2", "m3"]);
        let first = spool
            .dead_letters(Filter {
                limit: 1,
                ..Filter::default()
            })
            .await
            .unwrap()
            .remove(0);
        assert_eq!(first.to_message().payload, message(1).payload);
        assert_eq!(first.to_message().tenant_id.as_deref(), Some("acme"));
        assert_eq!(first.to_json()["payload"], "{\"n\":1}");
        spool.remove_dead_letter(first.id).await.unwrap();
        assert_eq!(spool.dead_letter_count().await.unwrap(), 2);
        let second = spool
            .dead_letters(Filter {
                limit: 1,
                ..Filter::default()
            })
            .await
            .unwrap()
            .remove(0);
        spool
            .dead_letter_failed_again(second.id, Code::DestinationUnavailable, "still down", 3)
            .await
            .unwrap();
        let again = spool
            .dead_letters(Filter {
                limit: 1,
                ..Filter::default()
            })
            .await
            .unwrap()
            .remove(0);
        assert_eq!(
            (
                again.id,
                again.code,
                again.reason.as_str(),
                again.attempts,
                again.replays
            ),
            (second.id, Code::DestinationUnavailable, "still down", 3, 1)
        );
        assert_eq!(again.payload, second.payload, "the message itself is kept");
    }
}
