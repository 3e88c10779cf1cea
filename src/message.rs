//! The message model: what every source produces and every later stage reads.
//!
//! A [`Message`] carries the device payload as raw bytes; it is parsed once, by the engine, and
//! only when a rule's topic filter selects the message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

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

/// The names of the identity a forwarded message carries with it (AMQP headers, AMQP 1.0
/// application properties), in order, with their values: `topic`, `productKey`,
/// `deviceName`, `messageId`, `traceId`, and `rule`, the rule that forwarded it.
pub fn identity_properties<'a>(
    topic: &'a str,
    product_key: &'a str,
    device_name: &'a str,
    message_id: &'a str,
    trace_id: &'a str,
    rule: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("topic", topic),
        ("productKey", product_key),
        ("deviceName", device_name),
        ("messageId", message_id),
        ("traceId", trace_id),
        ("rule", rule),
    ]
}

impl Message {
    /// [`identity_properties`] of this message as forwarded by `rule`.
    pub fn identity_properties<'a>(&'a self, rule: &'a str) -> [(&'static str, &'a str); 6] {
        identity_properties(
            &self.topic,
            &self.product_key,
            &self.device_name,
            &self.message_id,
            &self.trace_id,
            rule,
        )
    }
}

/// Why a message could not be accepted from a source. The status code each kind is logged
/// with is decided in `outcome` (`Failure::rejected`), where every code is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub reason: String,
}

/// What was wrong with a message a source could not accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectionKind {
    /// The topic is not of the platform's form `/productKey/deviceName/...` (1903).
    Topic,
    /// The envelope around the payload is unusable (9321).
    Envelope,
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

impl Identity {
    /// Forgets the identity overrides (`productKey`, `deviceName`, `tenantId`, `instanceId`),
    /// so the message takes its identity from its topic; ids and the timestamp stay. Returns
    /// whether there was any (non-empty) override to forget: a source counts those.
    pub fn drop_overrides(&mut self) -> bool {
        [
            &mut self.product_key,
            &mut self.device_name,
            &mut self.tenant_id,
            &mut self.instance_id,
        ]
        .into_iter()
        .map(|field| field.take().is_some_and(|v| !v.is_empty()))
        .fold(false, |any, dropped| any | dropped)
    }
}

impl Message {
    /// Builds a message from a topic and payload; productKey and deviceName come from topic levels
    /// 1 and 2 unless `identity` names them. A topic not of the form `/pk/dn/...` is rejected with
    /// 1903, and an empty id in `identity` is treated as absent.
    pub fn new(topic: String, payload: Bytes, identity: Identity) -> Result<Message, Rejection> {
        let (pk, dn) = parse_platform_topic(&topic).map_err(|reason| Rejection {
            kind: RejectionKind::Topic,
            reason,
        })?;
        let (pk, dn) = (pk.to_owned(), dn.to_owned());
        Ok(Message::with_identity(topic, pk, dn, payload, identity))
    }

    /// A message on a platform topic already split into `pk` and `dn`.
    fn with_identity(
        topic: String,
        pk: String,
        dn: String,
        payload: Bytes,
        identity: Identity,
    ) -> Message {
        let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
        let product_key = non_empty(identity.product_key).unwrap_or(pk);
        let device_name = non_empty(identity.device_name).unwrap_or(dn);
        Message {
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
        }
    }
}

/// The JSON envelope accepted by the HTTP ingest (one object, or one per NDJSON line).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    pub topic: String,
    /// The payload as JSON (any JSON value; rules need an object), kept as its text: the
    /// message carries these bytes as they came, without a parse into a tree and a
    /// serialization back (the engine parses what its rules reference).
    #[serde(default)]
    pub payload: Option<Box<serde_json::value::RawValue>>,
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
        self.into_message_trusting(true).map(|(m, _)| m)
    }

    /// [`Envelope::into_message`], taking the envelope's `productKey`, `deviceName`, `tenantId`
    /// and `instanceId` only when `trust_identity`; otherwise the topic gives the identity, and
    /// the second value says whether an override was there and ignored.
    pub fn into_message_trusting(self, trust_identity: bool) -> Result<(Message, bool), Rejection> {
        self.into_message_keeping(trust_identity)
            .map_err(|refused| refused.rejection)
    }

    /// [`Envelope::into_message_trusting`]; a refusal gives back what the rejection's record
    /// needs (topic, payload text, the ids the envelope gave) without copying them up front.
    pub fn into_message_keeping(
        self,
        trust_identity: bool,
    ) -> Result<(Message, bool), Box<Refused>> {
        let ids = |message_id, trace_id| Identity {
            message_id,
            trace_id,
            ..Identity::default()
        };
        let payload = match (self.payload, self.payload_base64) {
            (Some(raw), None) => Ok(raw_bytes(raw)),
            (Some(raw), Some(_)) => Err((
                "give either payload or payload_base64, not both".to_owned(),
                raw_bytes(raw),
            )),
            (None, None) => Err((
                "missing payload (or payload_base64)".to_owned(),
                Bytes::new(),
            )),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map(Bytes::from)
                .map_err(|e| {
                    (
                        format!("payload_base64 is not valid base64: {e}"),
                        Bytes::new(),
                    )
                }),
        };
        let payload = match payload {
            Ok(p) => p,
            Err((reason, payload)) => {
                return Err(Box::new(Refused {
                    rejection: bad_envelope(&reason),
                    topic: self.topic,
                    payload,
                    ids: ids(self.message_id, self.trace_id),
                }));
            }
        };
        let (pk, dn) = match parse_platform_topic(&self.topic) {
            Ok((pk, dn)) => (pk.to_owned(), dn.to_owned()),
            Err(reason) => {
                return Err(Box::new(Refused {
                    rejection: Rejection {
                        kind: RejectionKind::Topic,
                        reason,
                    },
                    topic: self.topic,
                    payload,
                    ids: ids(self.message_id, self.trace_id),
                }));
            }
        };
        let mut identity = Identity {
            message_id: self.message_id,
            trace_id: self.trace_id,
            timestamp_ms: self.timestamp,
            product_key: self.product_key,
            device_name: self.device_name,
            tenant_id: self.tenant_id,
            instance_id: self.instance_id,
        };
        let ignored = !trust_identity && identity.drop_overrides();
        let m = Message::with_identity(self.topic, pk, dn, payload, identity);
        Ok((m, ignored))
    }
}

/// An envelope the ingest cannot take ([`Envelope::into_message_keeping`]), with what its
/// rejection's record needs.
#[derive(Debug)]
pub struct Refused {
    pub rejection: Rejection,
    pub topic: String,
    /// The payload's text as given (empty for none, or for base64).
    pub payload: Bytes,
    /// The message and trace ids the envelope gave.
    pub ids: Identity,
}

/// The text of a JSON payload as bytes, without a copy.
fn raw_bytes(raw: Box<serde_json::value::RawValue>) -> Bytes {
    let text: Box<str> = raw.into();
    Bytes::from(String::from(text).into_bytes())
}

fn bad_envelope(reason: &str) -> Rejection {
    Rejection {
        kind: RejectionKind::Envelope,
        reason: reason.to_owned(),
    }
}

/// Longest platform topic accepted, in bytes.
pub const MAX_TOPIC_BYTES: usize = 1024;

/// Splits a platform topic `/{productKey}/{deviceName}/{rest...}` into
/// `(product_key, device_name)`.
///
/// Rejects (the caller reports code 1903) a topic longer than 1024 bytes, one that does
/// not start with '/', has fewer than 3 levels after the leading slash, has an empty
/// level (productKey and deviceName included), or contains '+', '#' or NUL. The error
/// text says exactly what is wrong.
pub fn parse_platform_topic(topic: &str) -> Result<(&str, &str), String> {
    if topic.len() > MAX_TOPIC_BYTES {
        // The topic itself is left out: it is too long to be useful in a log line.
        return Err(format!(
            "topic is {} bytes long, at most {MAX_TOPIC_BYTES} are allowed",
            topic.len()
        ));
    }
    if topic.is_empty() {
        return Err("topic is empty".to_string());
    }
    let Some(rest) = topic.strip_prefix('/') else {
        return Err(format!("topic {topic:?} does not start with '/'"));
    };
    let mut count = 0;
    for (i, level) in rest.split('/').enumerate() {
        let n = i + 1;
        count = n;
        let name = match n {
            1 => "productKey (level 1)".to_string(),
            2 => "deviceName (level 2)".to_string(),
            _ => format!("level {n}"),
        };
        if level.is_empty() {
            return Err(format!("{name} of topic {topic:?} is empty"));
        }
        for (c, what) in [('\0', "a NUL character"), ('+', "'+'"), ('#', "'#'")] {
            if level.contains(c) {
                return Err(format!(
                    "{name} of topic {topic:?} contains {what}, which a platform topic may not contain"
                ));
            }
        }
    }
    if count < 3 {
        return Err(format!(
            "topic {topic:?} has {count} level(s), a platform topic needs at least 3: \
             /{{productKey}}/{{deviceName}}/..."
        ));
    }
    let mut parts = rest.split('/');
    match (parts.next(), parts.next()) {
        (Some(product_key), Some(device_name)) => Ok((product_key, device_name)),
        _ => unreachable!("at least 3 levels were counted above"),
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
    fn untrusted_identity_overrides_are_dropped_and_reported() {
        let json = r#"{"topic":"/pk1/dev1/up","payload":{},"productKey":"other","deviceName":"d9",
            "tenantId":"t9","messageId":"m1"}"#;
        let parse = || serde_json::from_str::<Envelope>(json).unwrap();
        let (m, ignored) = parse().into_message_trusting(false).unwrap();
        assert!(ignored);
        assert_eq!(
            (m.product_key.as_str(), m.device_name.as_str()),
            ("pk1", "dev1")
        );
        assert_eq!((m.tenant_id, m.message_id.as_str()), (None, "m1"));
        let (m, ignored) = parse().into_message_trusting(true).unwrap();
        assert!(!ignored);
        assert_eq!(
            (m.product_key.as_str(), m.tenant_id.as_deref()),
            ("other", Some("t9"))
        );
        // Nothing to ignore: not counted.
        let plain = r#"{"topic":"/pk1/dev1/up","payload":{},"productKey":""}"#;
        let (_, ignored) = serde_json::from_str::<Envelope>(plain)
            .unwrap()
            .into_message_trusting(false)
            .unwrap();
        assert!(!ignored);
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
        assert_eq!(e.kind, RejectionKind::Envelope);
    }

    #[test]
    fn bad_topic_is_1903() {
        let e = envelope(r#"{"topic":"no-slash","payload":{}}"#).unwrap_err();
        assert_eq!(e.kind, RejectionKind::Topic);
        assert!(e.reason.contains("no-slash"), "{}", e.reason);
    }

    #[test]
    fn message_ids_are_unique_and_ordered() {
        let a = new_message_id();
        let b = new_message_id();
        assert!(a < b, "{a} {b}");
    }

    #[test]
    fn platform_topics_accepted() {
        assert_eq!(
            parse_platform_topic("/a1b2c3/dev01/thing/event/property/post"),
            Ok(("a1b2c3", "dev01"))
        );
        assert_eq!(parse_platform_topic("/pk/dn/user/update"), Ok(("pk", "dn")));
        assert_eq!(parse_platform_topic("/pk/dn/x"), Ok(("pk", "dn")));
        let longest = format!("/pk/dn/{}", "x".repeat(MAX_TOPIC_BYTES - 7));
        assert_eq!(longest.len(), MAX_TOPIC_BYTES);
        assert_eq!(parse_platform_topic(&longest), Ok(("pk", "dn")));
    }

    #[test]
    fn platform_topics_rejected_with_reason() {
        let cases = [
            ("", "topic is empty"),
            ("pk/dn/user", "topic \"pk/dn/user\" does not start with '/'"),
            (
                "/pk/dn",
                "topic \"/pk/dn\" has 2 level(s), a platform topic needs at least 3: \
                 /{productKey}/{deviceName}/...",
            ),
            (
                "//dn/user",
                "productKey (level 1) of topic \"//dn/user\" is empty",
            ),
            (
                "/pk//user",
                "deviceName (level 2) of topic \"/pk//user\" is empty",
            ),
            ("/pk/dn/", "level 3 of topic \"/pk/dn/\" is empty"),
            ("/pk/dn/a//b", "level 4 of topic \"/pk/dn/a//b\" is empty"),
            (
                "/pk/+/user",
                "deviceName (level 2) of topic \"/pk/+/user\" contains '+', \
                 which a platform topic may not contain",
            ),
            (
                "/pk/dn/#",
                "level 3 of topic \"/pk/dn/#\" contains '#', \
                 which a platform topic may not contain",
            ),
            (
                "/p\0k/dn/x",
                "productKey (level 1) of topic \"/p\\0k/dn/x\" contains a NUL character, \
                 which a platform topic may not contain",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_platform_topic(input).unwrap_err(), want, "{input:?}");
        }

        let too_long = format!("/pk/dn/{}", "x".repeat(MAX_TOPIC_BYTES - 6));
        assert_eq!(
            parse_platform_topic(&too_long).unwrap_err(),
            "topic is 1025 bytes long, at most 1024 are allowed"
        );
    }
}
