//! The log record: the platform's field set, one per step of a message.

use serde::Serialize;

use super::{BizCode, Code};
use crate::message::Message;

/// One step's outcome. Serializes with the platform's field names (`time`, `traceId`,
/// `messageId`, `productKey`, `deviceName`, `bizCode`, `operation`, `code`, `reason`, `content`,
/// `tenantId`, `instanceId`); `time` as RFC 3339 with milliseconds, UTC.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(rename = "time", serialize_with = "ser_time")]
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

impl Record {
    /// A record about `message`, timestamped now.
    pub fn for_message(
        message: &Message,
        biz_code: BizCode,
        operation: impl Into<String>,
        code: Code,
        reason: impl Into<String>,
        content: impl Into<String>,
    ) -> Record {
        Record {
            time_ms: crate::message::now_ms(),
            trace_id: message.trace_id.clone(),
            message_id: message.message_id.clone(),
            product_key: message.product_key.clone(),
            device_name: message.device_name.clone(),
            biz_code,
            operation: operation.into(),
            code,
            reason: reason.into(),
            content: content.into(),
            tenant_id: message.tenant_id.clone().unwrap_or_default(),
            instance_id: message.instance_id.clone().unwrap_or_default(),
        }
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

fn ser_time<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time_ms(*ms))
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
