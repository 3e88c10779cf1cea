//! The `[[action]]` and `[error_action]` tables of a rule file: one variant of [`ActionSpec`]
//! per kind of destination (`to = "amqp"`, `to = "group"`, `to = "mqtt"`). This is the rule file's schema;
//! what each kind does at run time lives in its folder under `src/action/`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::file::yes;
use super::template::Template;

/// One destination of a rule's outputs.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "to", rename_all = "lowercase")]
pub enum ActionSpec {
    /// Publish to a RabbitMQ exchange.
    Amqp(AmqpAction),
    /// Enqueue for an AMQP 1.0 consumer group hosted by iotfwd.
    Group(GroupAction),
    /// Publish to a topic of the `[mqtt]` broker.
    Mqtt(MqttAction),
}

impl ActionSpec {
    /// A short name for records and metrics: `amqp:<exchange>` or `group:<id>`.
    pub fn destination(&self) -> String {
        match self {
            ActionSpec::Amqp(a) => format!("amqp:{}", a.exchange),
            ActionSpec::Group(g) => format!("group:{}", g.group),
            ActionSpec::Mqtt(m) => format!("mqtt:{}", m.topic),
        }
    }

    /// Every template of the action, with its field name.
    pub fn templates(&self) -> Vec<(String, &Template)> {
        match self {
            ActionSpec::Amqp(a) => std::iter::once(("routing_key".to_owned(), &a.routing_key))
                .chain(a.headers.iter().map(|(k, v)| (format!("headers.{k}"), v)))
                .collect(),
            ActionSpec::Group(_) => Vec::new(),
            ActionSpec::Mqtt(m) => std::iter::once(("topic".to_owned(), &m.topic))
                .chain(
                    m.properties
                        .iter()
                        .map(|(k, v)| (format!("properties.{k}"), v)),
                )
                .collect(),
        }
    }
}

/// `to = "amqp"`: publish each output to an exchange, with publisher confirms.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpAction {
    /// The exchange to publish to ("" is the default exchange).
    pub exchange: String,
    /// Routing key template over the output's keys, e.g. `temp.${device}`.
    #[serde(default = "empty_template")]
    pub routing_key: Template,
    /// Extra headers, each a template.
    #[serde(default)]
    pub headers: BTreeMap<String, Template>,
    /// Persistent delivery (delivery mode 2); on by default.
    #[serde(default = "yes")]
    pub persistent: bool,
    /// How failures that may pass (broker down, nack) are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// Retries of one action: exponential backoff with jitter, bounded by a count and a deadline.
/// The defaults wait about 1 s, 3 s and 9 s between four attempts.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first attempt. Default 3; 0 disables retrying.
    pub max_retries: usize,
    /// Delay before the first retry, in ms. Default 1000.
    pub initial_delay_ms: u64,
    /// Each delay is this many times the previous one. Default 3.
    pub factor: f32,
    /// Upper bound of one delay, in ms. Default 10000.
    pub max_delay_ms: u64,
    /// Upper bound of all delays together, in ms. Default 30000.
    pub deadline_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_delay_ms: 1000,
            factor: 3.0,
            max_delay_ms: 10_000,
            deadline_ms: 30_000,
        }
    }
}

impl RetryPolicy {
    /// The backon backoff this policy describes.
    pub fn backoff(&self) -> backon::ExponentialBuilder {
        use std::time::Duration;
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.initial_delay_ms))
            .with_factor(self.factor.max(1.0))
            .with_max_delay(Duration::from_millis(
                self.max_delay_ms.max(self.initial_delay_ms),
            ))
            .with_max_times(self.max_retries)
            .with_total_delay(Some(Duration::from_millis(self.deadline_ms)))
            .with_jitter()
    }
}

fn empty_template() -> Template {
    Template::parse("").expect("the empty template parses")
}

/// `to = "group"`: hand each output to a consumer group of the AMQP 1.0 endpoint.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupAction {
    /// The consumer group's id.
    pub group: String,
}

/// `to = "mqtt"`: publish each output to a topic of the `[mqtt]` broker.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttAction {
    /// Topic template over the output's keys, e.g. `/${pk}/${device}/user/command`. A topic
    /// that resolves to something invalid (empty, `+` or `#`, a leading `$`) is 9321.
    pub topic: Template,
    /// 1 (the default: wait for the broker's PUBACK) or 0 (fire and forget).
    #[serde(default = "default_mqtt_qos")]
    pub qos: MqttQos,
    /// The broker keeps the last message of the topic for new subscribers. Default false.
    #[serde(default)]
    pub retain: bool,
    /// MQTT 5 user properties, each a template, sent after the identity (`messageId`,
    /// `traceId`, `rule`, …). Ignored under `protocol = "3.1.1"`, which has none.
    #[serde(default)]
    pub properties: BTreeMap<String, Template>,
    /// How failures that may pass (broker down, a failure PUBACK) are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// The QoS of an MQTT publish: 0 or 1 (2 is not supported).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum MqttQos {
    AtMostOnce,
    AtLeastOnce,
}

impl TryFrom<u8> for MqttQos {
    type Error = String;

    fn try_from(qos: u8) -> Result<MqttQos, String> {
        match qos {
            0 => Ok(MqttQos::AtMostOnce),
            1 => Ok(MqttQos::AtLeastOnce),
            other => Err(format!("qos {other} is not supported; use 1 or 0")),
        }
    }
}

impl From<MqttQos> for u8 {
    fn from(qos: MqttQos) -> u8 {
        match qos {
            MqttQos::AtMostOnce => 0,
            MqttQos::AtLeastOnce => 1,
        }
    }
}

fn default_mqtt_qos() -> MqttQos {
    MqttQos::AtLeastOnce
}
