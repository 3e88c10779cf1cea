//! The message model: what every source produces and every later stage reads.
//!
//! A [`Message`] carries the device payload as raw bytes; it is parsed once, by the engine, and
//! only when a rule's topic filter selects the message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::outcome::Code;
use crate::rules::topic::parse_platform_topic;

/// One device message on its way through the daemon.
#[derive(Clone, Debug)]
pub struct Message {
    /// The MQTT-style topic, e.g. `/a1b2c3/dev01/thing/event/property/post`.
    pub topic: String,
    /// Topic level 1, unless a source header overrides it.
    pub product_key: String,
    /// Topic level 2, unless a source header overrides it.
    pub device_name: String,
    /// Unique id of this message; from the envelope, or generated.
    pub message_id: String,
    /// The id that follows this message through every step; from the envelope, or generated.
    pub trace_id: String,
    pub tenant_id: Option<String>,
    pub instance_id: Option<String>,
    /// Message time in milliseconds since the Unix epoch (envelope `timestamp`, else arrival).
    pub timestamp_ms: i64,
    /// When this process received it; the start of the end-to-end latency.
    pub received_at: Instant,
    /// The device payload, as received.
    pub payload: Bytes,
}

/// Why a message could not be accepted from a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: Code,
    pub reason: String,
}

/// Optional identity fields a source may supply beside the topic.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub message_id: Option<String>,
    pub trace_id: Option<String>,
    pub timestamp_ms: Option<i64>,
    pub product_key: Option<String>,
    pub device_name: Option<String>,
    pub tenant_id: Option<String>,
    pub instance_id: Option<String>,
}

impl Message {
    /// Builds a message from a topic and payload; productKey and deviceName come from topic levels
    /// 1 and 2 unless `identity` names them. A topic not of the form `/pk/dn/...` is rejected with
    /// 1903, and an empty id in `identity` is treated as absent.
    pub fn new(topic: String, payload: Bytes, identity: Identity) -> Result<Message, Rejection> {
        let (pk, dn) = parse_platform_topic(&topic).map_err(|reason| Rejection {
            code: Code::TopicInvalid,
            reason,
        })?;
        let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
        let product_key = non_empty(identity.product_key).unwrap_or_else(|| pk.to_owned());
        let device_name = non_empty(identity.device_name).unwrap_or_else(|| dn.to_owned());
        Ok(Message {
            product_key,
            device_name,
            message_id: non_empty(identity.message_id).unwrap_or_else(new_message_id),
            trace_id: non_empty(identity.trace_id).unwrap_or_else(new_trace_id),
            tenant_id: non_empty(identity.tenant_id),
            instance_id: non_empty(identity.instance_id),
            timestamp_ms: identity.timestamp_ms.unwrap_or_else(now_ms),
            received_at: Instant::now(),
            payload,
            topic,
        })
    }
}

/// The JSON envelope accepted by the HTTP ingest (one object, or one per NDJSON line).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    pub topic: String,
    /// The payload as JSON (any JSON value; rules need an object).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// The payload as base64, for binary payloads.
    #[serde(default, rename = "payload_base64", alias = "payloadBase64")]
    pub payload_base64: Option<String>,
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    pub timestamp: Option<i64>,
    #[serde(default)]
    pub product_key: Option<String>,
    #[serde(default)]
    pub device_name: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
}

impl Envelope {
    /// Turns the envelope into a message. Exactly one of `payload` and `payload_base64` must be
    /// present; an invalid topic gets 1903.
    pub fn into_message(self) -> Result<Message, Rejection> {
        let payload = match (self.payload, self.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(bad_envelope(
                    "give either payload or payload_base64, not both",
                ));
            }
            (None, None) => return Err(bad_envelope("missing payload (or payload_base64)")),
            (Some(value), None) => {
                Bytes::from(serde_json::to_vec(&value).expect("a Value serializes"))
            }
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map(Bytes::from)
                .map_err(|e| bad_envelope(&format!("payload_base64 is not valid base64: {e}")))?,
        };
        Message::new(
            self.topic,
            payload,
            Identity {
                message_id: self.message_id,
                trace_id: self.trace_id,
                timestamp_ms: self.timestamp,
                product_key: self.product_key,
                device_name: self.device_name,
                tenant_id: self.tenant_id,
                instance_id: self.instance_id,
            },
        )
    }
}

fn bad_envelope(reason: &str) -> Rejection {
    Rejection {
        code: Code::ParamInvalid,
        reason: reason.to_owned(),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A new message id: 19 decimal digits like the platform's, time-ordered and unique within the
/// process (milliseconds in the high bits, a sequence number in the low 20 bits).
pub fn new_message_id() -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF;
    let ms = (now_ms() as u64) & ((1 << 43) - 1);
    format!("{:019}", (ms << 20) | seq)
}

/// A new trace id: 32 lowercase hex digits, time-ordered like a UUIDv7: the milliseconds
/// since the epoch (12 digits), then 80 random bits. Ids made later sort later, so the record
/// store's traceId index grows at its end instead of at random places (inserts stay fast as
/// the store grows); 80 random bits keep them unique.
pub fn new_trace_id() -> String {
    let random = uuid::Uuid::new_v4().as_u128() & ((1u128 << 80) - 1);
    format!("{:012x}{random:020x}", (now_ms() as u64) & 0xFFFF_FFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_32_hex_digits_unique_and_time_ordered() {
        let a = new_trace_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_trace_id();
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{id}"
            );
        }
        assert!(a < b, "{a} then {b}");
        let many: std::collections::HashSet<String> = (0..10_000).map(|_| new_trace_id()).collect();
        assert_eq!(many.len(), 10_000);
    }

    fn envelope(json: &str) -> Result<Message, Rejection> {
        serde_json::from_str::<Envelope>(json)
            .unwrap()
            .into_message()
    }

    #[test]
    fn identity_comes_from_the_topic() {
        let m = envelope(r#"{"topic":"/pk1/dev1/user/update","payload":{"a":1}}"#).unwrap();
        assert_eq!(
            (m.product_key.as_str(), m.device_name.as_str()),
            ("pk1", "dev1")
        );
        assert_eq!(&m.payload[..], br#"{"a":1}"#);
        assert_eq!(m.message_id.len(), 19);
        assert_eq!(m.trace_id.len(), 32);
    }

    #[test]
    fn envelope_ids_are_kept() {
        let m = envelope(
            r#"{"topic":"/p/d/x","payload":1,"messageId":"m1","traceId":"t1","timestamp":5}"#,
        )
        .unwrap();
        assert_eq!(
            (m.message_id.as_str(), m.trace_id.as_str(), m.timestamp_ms),
            ("m1", "t1", 5)
        );
    }

    #[test]
    fn base64_payload() {
        let m = envelope(r#"{"topic":"/p/d/x","payload_base64":"AAEC"}"#).unwrap();
        assert_eq!(&m.payload[..], &[0, 1, 2]);
        let e = envelope(r#"{"topic":"/p/d/x","payload_base64":"!!"}"#).unwrap_err();
        assert_eq!(e.code, Code::ParamInvalid);
    }

    #[test]
    fn bad_topic_is_1903() {
        let e = envelope(r#"{"topic":"no-slash","payload":{}}"#).unwrap_err();
        assert_eq!(e.code, Code::TopicInvalid);
        assert!(e.reason.contains("no-slash"), "{}", e.reason);
    }

    #[test]
    fn message_ids_are_unique_and_ordered() {
        let a = new_message_id();
        let b = new_message_id();
        assert!(a < b, "{a} {b}");
    }
}
