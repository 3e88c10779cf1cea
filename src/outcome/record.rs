//! The log record: the platform's field set, one per step of a message.

use serde::Serialize;

use super::{BizCode, Code, Failure};
use crate::message::{Identity, Message, new_message_id, new_trace_id, now_ms};

/// One step's outcome. Serializes with the platform's field names (`time`, `traceId`,
/// `messageId`, `productKey`, `deviceName`, `bizCode`, `operation`, `code`, `reason`, `content`,
/// `tenantId`, `instanceId`); `time` as RFC 3339 with milliseconds, UTC.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(rename = "time", serialize_with = "ser_time_ms")]
    pub time_ms: i64,
    pub trace_id: String,
    pub message_id: String,
    pub product_key: String,
    pub device_name: String,
    pub biz_code: BizCode,
    /// What was done: the topic for `uplink`, `rule/<name>/<destination>` for `ruleengine`,
    /// the consumer group for `ServerSubscribe`.
    pub operation: String,
    pub code: Code,
    /// Why, in one line; empty on success.
    pub reason: String,
    /// Detail: the rule output, the attempt count, the payload excerpt.
    pub content: String,
    pub tenant_id: String,
    pub instance_id: String,
}

/// Who a record is about: a device message, or something standing for one (a consumer-group
/// delivery). Empty strings for what is unknown.
pub trait Subject {
    fn trace_id(&self) -> &str;
    fn message_id(&self) -> &str;
    fn product_key(&self) -> &str;
    fn device_name(&self) -> &str;
    fn tenant_id(&self) -> &str;
    fn instance_id(&self) -> &str;
}

impl Subject for Message {
    fn trace_id(&self) -> &str {
        &self.trace_id
    }
    fn message_id(&self) -> &str {
        &self.message_id
    }
    fn product_key(&self) -> &str {
        &self.product_key
    }
    fn device_name(&self) -> &str {
        &self.device_name
    }
    fn tenant_id(&self) -> &str {
        self.tenant_id.as_deref().unwrap_or_default()
    }
    fn instance_id(&self) -> &str {
        self.instance_id.as_deref().unwrap_or_default()
    }
}

/// How a consumer-group delivery ended, or why it waits (see [`Record::group`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOutcome<'a> {
    /// 200: the consumer accepted it.
    Accepted,
    /// 9651: the consumer released (or modified) it; it is redelivered.
    Released { attempt: u32 },
    /// 9650: no outcome within the group's ACK time-out; it is redelivered.
    AckTimeout { ack_timeout_ms: u64, attempt: u32 },
    /// 9652: the consumer rejected it, with the consumer's error description (may be empty).
    Rejected { error: &'a str },
    /// 9203: no consumer of the group is online; it waits in the backlog.
    Offline,
    /// 9203: it waited in the backlog longer than the group's retention and was dropped.
    Expired { retention_s: u64 },
}

/// Why the endpoint refused or closed a consumer's connection (see [`Record::group_connection`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// 9600: the group already has `max_connections` connections.
    LimitReached,
    /// 9601: the client's idle time-out (heartbeat) is outside 30–300 s.
    HeartbeatInvalid,
    /// 9602: the endpoint closed the connection (shutdown).
    ServerClosed,
}

impl ConnectionEvent {
    pub fn code(self) -> Code {
        match self {
            ConnectionEvent::LimitReached => Code::GroupConnectionLimit,
            ConnectionEvent::HeartbeatInvalid => Code::HeartbeatInvalid,
            ConnectionEvent::ServerClosed => Code::ServerClosed,
        }
    }
}

/// The last segment of the operation of a dead-letter step (`{rule}/dead-letter`).
pub const DEAD_LETTER_STEP: &str = "dead-letter";
/// How the reason of a dead-letter step that went through begins.
const DEAD_LETTERED: &str = "dead-lettered to";
/// How the reason of a replay's `uplink` record begins.
const REPLAY: &str = "replay from the dead-letter queue";

/// Most bytes of a payload a record's `content` carries.
pub const EXCERPT_BYTES: usize = 256;

/// Up to [`EXCERPT_BYTES`] of a payload, as text, for a record's content; `…` marks a cut.
pub fn payload_excerpt(payload: &[u8]) -> String {
    let cut = &payload[..payload.len().min(EXCERPT_BYTES)];
    let text = String::from_utf8_lossy(cut);
    if payload.len() > cut.len() {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

/// The records of each step. Every record of the data path is built by one of these, so each
/// status code is decided in one place: here, or in [`Failure`]'s constructors.
impl Record {
    /// This step's record, now, about no one yet: every id empty.
    fn step(
        biz_code: BizCode,
        operation: String,
        code: Code,
        reason: String,
        content: String,
    ) -> Record {
        Record {
            time_ms: now_ms(),
            trace_id: String::new(),
            message_id: String::new(),
            product_key: String::new(),
            device_name: String::new(),
            biz_code,
            operation,
            code,
            reason,
            content,
            tenant_id: String::new(),
            instance_id: String::new(),
        }
    }

    /// This step's record about `subject`: its ids, tenant and instance.
    fn about(self, subject: &impl Subject) -> Record {
        Record {
            trace_id: subject.trace_id().to_owned(),
            message_id: subject.message_id().to_owned(),
            product_key: subject.product_key().to_owned(),
            device_name: subject.device_name().to_owned(),
            tenant_id: subject.tenant_id().to_owned(),
            instance_id: subject.instance_id().to_owned(),
            ..self
        }
    }

    /// A record about no message (a refused connection, a rule file): a fresh trace id, so
    /// it can still be looked up on its own.
    fn unattached(self) -> Record {
        Record {
            trace_id: new_trace_id(),
            ..self
        }
    }

    /// `uplink` 200: a source accepted the message. Operation: its topic; content: the start
    /// of its payload.
    pub fn uplink(message: &Message) -> Record {
        Record::step(
            BizCode::Uplink,
            message.topic.clone(),
            Code::Ok,
            String::new(),
            payload_excerpt(&message.payload),
        )
        .about(message)
    }

    /// `uplink` with the failure's code (1903, 9321): a source could not accept a message. It
    /// keeps the ids the message came with (`given`: an envelope's `messageId` and `traceId`, a
    /// delivery's message id), so it can be looked up by them; ids it lacks are fresh.
    pub fn rejected(topic: &str, payload: &[u8], failure: &Failure, given: &Identity) -> Record {
        let kept = |id: &Option<String>| id.as_ref().filter(|id| !id.is_empty()).cloned();
        Record {
            message_id: kept(&given.message_id).unwrap_or_else(new_message_id),
            trace_id: kept(&given.trace_id).unwrap_or_else(new_trace_id),
            ..Record::step(
                BizCode::Uplink,
                topic.to_owned(),
                failure.code(),
                failure.reason().to_owned(),
                payload_excerpt(payload),
            )
        }
    }

    /// `ruleengine` with the failure's code (9307, 9320, 9399): evaluating `rule` failed for
    /// this message.
    pub fn rule_failed(message: &Message, rule: &str, failure: &Failure) -> Record {
        Record::step(
            BizCode::RuleEngine,
            rule.to_owned(),
            failure.code(),
            failure.reason().to_owned(),
            payload_excerpt(&message.payload),
        )
        .about(message)
    }

    /// `ruleengine` 200 for a rule with no action: its output is the result.
    pub fn rule_output(message: &Message, rule: &str, output_json: String) -> Record {
        Record::step(
            BizCode::RuleEngine,
            rule.to_owned(),
            Code::Ok,
            String::new(),
            output_json,
        )
        .about(message)
    }

    /// `ruleengine`: the terminal outcome of one action (operation `rule/destination`), 200 or
    /// the failure's code. `content` says what was sent and how many attempts it took.
    pub fn action(
        subject: &impl Subject,
        rule: &str,
        destination: &str,
        result: &Result<(), Failure>,
        content: String,
    ) -> Record {
        let (code, reason) = match result {
            Ok(()) => (Code::Ok, String::new()),
            Err(f) => (f.code(), f.reason().to_owned()),
        };
        Record::step(
            BizCode::RuleEngine,
            format!("{rule}/{destination}"),
            code,
            reason,
            content,
        )
        .about(subject)
    }

    /// `ruleengine`, operation `{rule}/dead-letter`: a forward of `rule` that failed for good
    /// at `destination` with `code` and `why` (its last failure, recorded by its own step) was
    /// handed to the dead-letter queue `queue` (`spool:<file>` or `amqp:<exchange>`). `written`
    /// is that write's result: 200 when it went through (the message waits in the queue; the
    /// reason names the failure, so the failure itself is counted once, by its own record),
    /// else the write's code (the source redelivers the message).
    pub fn dead_letter(
        subject: &impl Subject,
        rule: &str,
        destination: &str,
        code: Code,
        why: &str,
        queue: &str,
        written: &Result<(), Failure>,
    ) -> Record {
        let failed = code;
        let (code, reason) = match written {
            Ok(()) => (
                Code::Ok,
                format!("{DEAD_LETTERED} {queue} after {destination} failed with {failed}: {why}"),
            ),
            Err(e) => (
                e.code(),
                format!(
                    "could not dead-letter to {queue} ({}); the source redelivers the message (it failed at {destination} with {failed}: {why})",
                    e.reason(),
                ),
            ),
        };
        Record::step(
            BizCode::RuleEngine,
            format!("{rule}/{DEAD_LETTER_STEP}"),
            code,
            reason,
            destination.to_owned(),
        )
        .about(subject)
    }

    /// `uplink` 200: an operator replayed a message from the dead-letter queue; it runs
    /// through the pipeline again under its original ids. The reason says it is a replay and
    /// of what (`of`: the rule, destination and last failure), so a trace shows it.
    pub fn replay(message: &Message, of: &str) -> Record {
        Record::step(
            BizCode::Uplink,
            message.topic.clone(),
            Code::Ok,
            format!("{REPLAY} ({of})"),
            payload_excerpt(&message.payload),
        )
        .about(message)
    }

    /// `ruleengine` with the rule compiler's code (9307, 9321; 9399 for a panic while loading):
    /// a rule file that does not load. Operation:
    /// the rule's name, else the file; content: the file.
    pub fn rule_file_failed(
        rule: &str,
        file: &str,
        code: Code,
        reason: &str,
        previous_running: bool,
        time_ms: i64,
    ) -> Record {
        let mut reason = reason.to_owned();
        if previous_running {
            reason.push_str(" (the previous version of the rule keeps running)");
        }
        let mut record = Record::step(
            BizCode::RuleEngine,
            if rule.is_empty() { file } else { rule }.to_owned(),
            code,
            reason,
            file.to_owned(),
        )
        .unattached();
        record.message_id = new_message_id();
        record.time_ms = time_ms;
        record
    }

    /// `ServerSubscribe`: a delivery to consumer group `group` (operation) ended, or waits.
    /// `client` is the consumer's client id when one had it (the content then names it and the
    /// rule), else the content is the start of the delivered body. `tenant` stands in when the
    /// message names none.
    pub fn group(
        subject: &impl Subject,
        group: &str,
        tenant: &str,
        outcome: GroupOutcome<'_>,
        client: &str,
        rule: &str,
        body: &[u8],
    ) -> Record {
        let (code, reason) = match outcome {
            GroupOutcome::Accepted => (Code::Ok, String::new()),
            GroupOutcome::Released { attempt } => (
                Code::Released,
                format!("the consumer released it (attempt {attempt}); redelivering"),
            ),
            GroupOutcome::AckTimeout {
                ack_timeout_ms,
                attempt,
            } => (
                Code::AckTimeout,
                format!(
                    "no outcome within the ack time-out ({ack_timeout_ms} ms, attempt {attempt}); redelivering"
                ),
            ),
            GroupOutcome::Rejected { error } => (
                Code::Rejected,
                if error.is_empty() {
                    "the consumer rejected it".to_owned()
                } else {
                    format!("the consumer rejected it ({error})")
                },
            ),
            GroupOutcome::Offline => (
                Code::ConsumerOffline,
                format!(
                    "no consumer of group {group:?} is online; the message waits in the backlog"
                ),
            ),
            GroupOutcome::Expired { retention_s } => (
                Code::ConsumerOffline,
                format!(
                    "expired after the group's retention ({retention_s} s) with no consumer taking it"
                ),
            ),
        };
        let content = if client.is_empty() {
            payload_excerpt(body)
        } else {
            serde_json::json!({ "client": client, "rule": rule }).to_string()
        };
        let mut record = Record::step(
            BizCode::ServerSubscribe,
            group.to_owned(),
            code,
            reason,
            content,
        )
        .about(subject);
        if record.tenant_id.is_empty() {
            tenant.clone_into(&mut record.tenant_id);
        }
        record
    }

    /// `ServerSubscribe` 9600 / 9601 / 9602: the endpoint refused or closed a consumer's
    /// connection to `group`.
    pub fn group_connection(
        group: &str,
        tenant: &str,
        client: &str,
        peer: &str,
        event: ConnectionEvent,
        reason: String,
    ) -> Record {
        let mut record = Record::step(
            BizCode::ServerSubscribe,
            group.to_owned(),
            event.code(),
            reason,
            serde_json::json!({ "client": client, "peer": peer }).to_string(),
        )
        .unattached();
        tenant.clone_into(&mut record.tenant_id);
        record
    }

    /// Whether this is a dead-letter step whose write went through ([`Record::dead_letter`]):
    /// a 200 that is no delivery.
    pub fn is_dead_lettered(&self) -> bool {
        self.biz_code == BizCode::RuleEngine
            && self.operation.ends_with(&format!("/{DEAD_LETTER_STEP}"))
            && self.reason.starts_with(DEAD_LETTERED)
    }

    /// Whether this is the `uplink` of a replay from the dead-letter queue ([`Record::replay`]).
    pub fn is_replay(&self) -> bool {
        self.biz_code == BizCode::Uplink && self.reason.starts_with(REPLAY)
    }

    /// The same record with another reason; the code stays as its constructor decided.
    pub fn with_reason(mut self, reason: String) -> Record {
        self.reason = reason;
        self
    }

    /// The same record at another time. The data path records each step when it happens;
    /// this is for records that stand for steps of the past (a benchmark's fill, a test's
    /// history), whose code the constructor still decides.
    pub fn with_time_ms(mut self, time_ms: i64) -> Record {
        self.time_ms = time_ms;
        self
    }

    /// `time` as RFC 3339 with milliseconds, UTC.
    pub fn time_rfc3339(&self) -> String {
        format_time_ms(self.time_ms)
    }
}

/// RFC 3339 with milliseconds, UTC (`2026-11-27T02:00:00.123Z`).
pub fn format_time_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Serializes milliseconds since the epoch as [`format_time_ms`] text.
pub fn ser_time_ms<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time_ms(*ms))
}

/// [`ser_time_ms`] for an optional time (`null` when absent).
pub fn ser_opt_time_ms<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_time_ms(*ms)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_platform_field_names() {
        let r = Record {
            time_ms: 0,
            trace_id: "t".into(),
            message_id: "m".into(),
            product_key: "p".into(),
            device_name: "d".into(),
            biz_code: BizCode::RuleEngine,
            operation: "rule/x/amqp".into(),
            code: Code::SqlError,
            reason: "r".into(),
            content: "c".into(),
            tenant_id: String::new(),
            instance_id: String::new(),
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "time",
                "traceId",
                "messageId",
                "productKey",
                "deviceName",
                "bizCode",
                "operation",
                "code",
                "reason",
                "content",
                "tenantId",
                "instanceId"
            ]
        );
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["code"], 9307);
        assert_eq!(v["bizCode"], "ruleengine");
    }
}
