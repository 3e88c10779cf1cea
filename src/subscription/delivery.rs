//! [`Delivery`]: one rule output on its way to a consumer group, and how it looks on the
//! wire (AMQP 1.0 to consumers, AMQP 0-9-1 headers in a broker-backed backlog).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::{header, header_text, identity_headers};
use crate::engine::Output;
use crate::message::{Message, identity_properties};
use crate::outcome::Subject;

/// One message for a group: the rule output and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The rule output, as JSON.
    pub body: Bytes,
    pub topic: String,
    pub product_key: String,
    pub device_name: String,
    pub message_id: String,
    pub trace_id: String,
    pub rule: String,
    /// When the device message was generated, ms since the epoch.
    pub generate_time: i64,
    pub tenant_id: String,
    pub instance_id: String,
}

/// The application properties every delivery carries, in order.
pub const PROPERTIES: [&str; 7] = [
    "topic",
    "productKey",
    "deviceName",
    "messageId",
    "traceId",
    "rule",
    "generateTime",
];

impl Delivery {
    pub fn new(message: &Message, rule: &str, output: &Output) -> Delivery {
        Delivery {
            body: Bytes::from(serde_json::to_vec(output).expect("a JSON map serializes")),
            topic: message.topic.clone(),
            product_key: message.product_key.clone(),
            device_name: message.device_name.clone(),
            message_id: message.message_id.clone(),
            trace_id: message.trace_id.clone(),
            rule: rule.to_owned(),
            generate_time: message.timestamp_ms,
            tenant_id: message.tenant_id.clone().unwrap_or_default(),
            instance_id: message.instance_id.clone().unwrap_or_default(),
        }
    }

    fn text_properties(&self) -> [(&'static str, &str); 6] {
        identity_properties(
            &self.topic,
            &self.product_key,
            &self.device_name,
            &self.message_id,
            &self.trace_id,
            &self.rule,
        )
    }

    /// The AMQP 1.0 message a consumer receives.
    pub fn to_amqp(
        &self,
    ) -> fe2o3_amqp::types::messaging::Message<fe2o3_amqp::types::messaging::Data> {
        use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Properties};
        use fe2o3_amqp::types::primitives::{Binary, SimpleValue};
        let mut props = ApplicationProperties::builder();
        for (name, value) in self.text_properties() {
            props = props.insert(name, SimpleValue::String(value.to_owned()));
        }
        props = props.insert("generateTime", SimpleValue::Long(self.generate_time));
        fe2o3_amqp::types::messaging::Message::builder()
            .properties(
                Properties::builder()
                    .message_id(self.message_id.clone())
                    .content_type("application/json")
                    .build(),
            )
            .application_properties(props.build())
            .data(Data(Binary::from(self.body.to_vec())))
            .build()
    }

    /// The headers of its copy in a broker-backed backlog.
    pub(super) fn to_headers(&self) -> FieldTable {
        let mut h = identity_headers(FieldTable::default(), self.text_properties());
        h.insert(
            "generateTime".into(),
            AMQPValue::LongLongInt(self.generate_time),
        );
        h.insert("tenantId".into(), header(&self.tenant_id));
        h.insert("instanceId".into(), header(&self.instance_id));
        h
    }

    pub(super) fn from_rabbit(body: &[u8], headers: Option<&FieldTable>) -> Delivery {
        let get = |name: &str| {
            headers
                .and_then(|h| h.inner().get(name))
                .and_then(header_text)
                .unwrap_or_default()
        };
        let generate_time = match headers.and_then(|h| h.inner().get("generateTime")) {
            Some(AMQPValue::LongLongInt(v)) => *v,
            Some(v) => header_text(v).and_then(|t| t.parse().ok()).unwrap_or(0),
            None => 0,
        };
        Delivery {
            body: Bytes::copy_from_slice(body),
            topic: get("topic"),
            product_key: get("productKey"),
            device_name: get("deviceName"),
            message_id: get("messageId"),
            trace_id: get("traceId"),
            rule: get("rule"),
            generate_time,
            tenant_id: get("tenantId"),
            instance_id: get("instanceId"),
        }
    }

    /// Its row in the spool (an embedded-default backlog): a JSON object of its fields,
    /// with the body (a rule output, so JSON text) as a string.
    pub(super) fn to_spool(&self) -> Vec<u8> {
        let body = String::from_utf8_lossy(&self.body);
        serde_json::to_vec(&serde_json::json!({
            "body": body,
            "topic": self.topic,
            "productKey": self.product_key,
            "deviceName": self.device_name,
            "messageId": self.message_id,
            "traceId": self.trace_id,
            "rule": self.rule,
            "generateTime": self.generate_time,
            "tenantId": self.tenant_id,
            "instanceId": self.instance_id,
        }))
        .expect("a JSON object serializes")
    }

    /// Reads a row written by [`Delivery::to_spool`]; why not, when it is not one.
    pub(super) fn from_spool(row: &[u8]) -> Result<Delivery, String> {
        let v: serde_json::Value =
            serde_json::from_slice(row).map_err(|e| format!("not JSON: {e}"))?;
        let text = |name: &str| -> Result<String, String> {
            v.get(name)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("no text field {name:?}"))
        };
        Ok(Delivery {
            body: Bytes::from(text("body")?),
            topic: text("topic")?,
            product_key: text("productKey")?,
            device_name: text("deviceName")?,
            message_id: text("messageId")?,
            trace_id: text("traceId")?,
            rule: text("rule")?,
            generate_time: v
                .get("generateTime")
                .and_then(serde_json::Value::as_i64)
                .ok_or("no integer field \"generateTime\"")?,
            tenant_id: text("tenantId")?,
            instance_id: text("instanceId")?,
        })
    }

    /// A message standing for this delivery, for the rule's error action: its payload is the
    /// delivered body.
    pub fn to_message(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            product_key: self.product_key.clone(),
            device_name: self.device_name.clone(),
            message_id: self.message_id.clone(),
            trace_id: self.trace_id.clone(),
            tenant_id: (!self.tenant_id.is_empty()).then(|| self.tenant_id.clone()),
            instance_id: (!self.instance_id.is_empty()).then(|| self.instance_id.clone()),
            timestamp_ms: self.generate_time,
            received_at: Instant::now(),
            payload: self.body.clone(),
        }
    }
}

impl Subject for Delivery {
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
        &self.tenant_id
    }
    fn instance_id(&self) -> &str {
        &self.instance_id
    }
}

/// A delivery that ends here without a consumer accepting it, on its way to the rule's error
/// action (a reject) and the dead-letter queue: rejected (9652), or released (9651) or timed
/// out (9650) `max_redeliveries` times.
pub struct RejectedDelivery {
    pub group: String,
    pub delivery: Arc<Delivery>,
    /// The last outcome: 9652, 9651 or 9650.
    pub code: crate::outcome::Code,
    pub reason: String,
    /// Times it was handed to a consumer.
    pub attempts: u32,
    /// Resolves with whether it was taken: by the error action (200) or the dead-letter
    /// queue. When it was not, the group delivers it again.
    pub done: tokio::sync::oneshot::Sender<bool>,
}
