//! The platform status codes: the single source of truth for what each code means.
//!
//! Every log record carries a `code` (200 = success) and a `bizCode` (service type). This
//! module holds, once, for every code iotfwd can log: the service type it is logged under,
//! when iotfwd logs it, and the platform's meaning, cause and troubleshooting text (from the
//! IoT platform's error-code reference), the latter two worded for an iotfwd operator.
//! `iotfwd codes` prints [`render_catalog`], `iotfwd codes 9307` prints [`render_one`], and log
//! queries show the entry beside a failure.
//!
//! Decisions worth knowing:
//! - `meaning` is the reference's text, with "cloud product" / "cloud" replaced by
//!   "destination" / "server" where the platform names its own products.
//! - All texts are single-line prose (no `\n`); renderers wrap them as they need.
//! - 200 is logged under every service type. Its [`CodeInfo::biz_code`] is
//!   [`BizCode::Uplink`] (the first step of a message); [`CodeInfo::biz_codes`] lists all of
//!   them, and the renderers print "any".
//! - A compile-time check keeps [`Code::ALL`] and [`catalog`] in step: same length, same
//!   order, strictly ascending codes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Service type of a log record (the platform's bizCode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BizCode {
    /// A message was received from a source.
    #[serde(rename = "uplink")]
    Uplink,
    /// Data forwarding: rule evaluation, quotas and forwarding to RabbitMQ exchanges.
    #[serde(rename = "ruleengine")]
    RuleEngine,
    /// Server-side subscription: delivery to a consumer group on iotfwd's AMQP 1.0 endpoint.
    #[serde(rename = "ServerSubscribe")]
    ServerSubscribe,
}

impl BizCode {
    /// Every service type, in the order a message passes through them.
    pub const ALL: [BizCode; 3] = [
        BizCode::Uplink,
        BizCode::RuleEngine,
        BizCode::ServerSubscribe,
    ];

    /// The platform's name: `"uplink"`, `"ruleengine"` or `"ServerSubscribe"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BizCode::Uplink => "uplink",
            BizCode::RuleEngine => "ruleengine",
            BizCode::ServerSubscribe => "ServerSubscribe",
        }
    }

    /// Parses the platform's name; the match ignores ASCII case (`"serversubscribe"` works).
    pub fn parse(s: &str) -> Option<BizCode> {
        BizCode::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .or_else(|| {
                BizCode::ALL
                    .into_iter()
                    .find(|b| b.as_str().eq_ignore_ascii_case(s))
            })
    }
}

impl fmt::Display for BizCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A platform status code that iotfwd logs. The discriminant is the number itself.
///
/// Serialized as the bare number (`9307`); deserializing an unknown number is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum Code {
    /// 200: the step succeeded.
    Ok = 200,
    /// 1903: the message topic is not of the form `/productKey/deviceName/...`.
    TopicInvalid = 1903,
    /// 9203: forwarded to a consumer group with no consumer online.
    ConsumerOffline = 9203,
    /// 9307: rule SQL does not parse or plan, or a function got unusable runtime arguments.
    SqlError = 9307,
    /// 9320: the payload is not a JSON object, for a rule that reads it as JSON.
    PayloadInvalid = 9320,
    /// 9321: an action's parameters resolved to something invalid.
    ParamInvalid = 9321,
    /// 9324: tenant or device over its forwarding quota.
    Throttled = 9324,
    /// 9325: destination unreachable after all retries.
    DestinationUnavailable = 9325,
    /// 9326: instance over its forwarding-TPS specification.
    InstanceSpecExceeded = 9326,
    /// 9331: the destination refused the message (publisher nack, channel error).
    DestinationError = 9331,
    /// 9332: the destination is misconfigured (exchange missing, 404).
    DestinationMisconfigured = 9332,
    /// 9333: the destination refused iotfwd's credentials (403).
    DestinationAuth = 9333,
    /// 9399: unexpected internal error.
    Internal = 9399,
    /// 9600: consumer group connection limit exceeded.
    GroupConnectionLimit = 9600,
    /// 9601: client heartbeat (idle time-out) outside 30–300 s.
    HeartbeatInvalid = 9601,
    /// 9602: the endpoint closed a client's connection.
    ServerClosed = 9602,
    /// 9650: no ACK from the consumer within the ACK time-out.
    AckTimeout = 9650,
    /// 9651: the consumer released the message.
    Released = 9651,
    /// 9652: the consumer rejected the message (NACK).
    Rejected = 9652,
}

impl Code {
    /// Every code, ascending by number (the same order as [`catalog`]).
    pub const ALL: &'static [Code] = &[
        Code::Ok,
        Code::TopicInvalid,
        Code::ConsumerOffline,
        Code::SqlError,
        Code::PayloadInvalid,
        Code::ParamInvalid,
        Code::Throttled,
        Code::DestinationUnavailable,
        Code::InstanceSpecExceeded,
        Code::DestinationError,
        Code::DestinationMisconfigured,
        Code::DestinationAuth,
        Code::Internal,
        Code::GroupConnectionLimit,
        Code::HeartbeatInvalid,
        Code::ServerClosed,
        Code::AckTimeout,
        Code::Released,
        Code::Rejected,
    ];

    /// The number, e.g. 9307.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code with this number, if iotfwd knows it.
    pub fn from_u16(code: u16) -> Option<Code> {
        Code::ALL
            .binary_search_by_key(&code, |c| c.as_u16())
            .ok()
            .map(|i| Code::ALL[i])
    }

    /// True only for [`Code::Ok`] (200); every other code is a failure.
    pub const fn is_success(self) -> bool {
        matches!(self, Code::Ok)
    }

    /// What a failure with this code is about (see [`Scope`]).
    pub fn scope(self) -> Scope {
        self.info().scope
    }

    /// This code's catalog entry.
    pub fn info(self) -> &'static CodeInfo {
        // `Code::ALL` and `CATALOG` have the same order (checked at compile time below).
        let index = Code::ALL
            .binary_search(&self)
            .expect("Code::ALL lists every variant");
        &CATALOG[index]
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u16::deserialize(deserializer)?;
        Code::from_u16(n).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Unsigned(u64::from(n)),
                &"a platform status code iotfwd knows (see `iotfwd codes`)",
            )
        })
    }
}

/// What a code says something about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// 200: nothing went wrong.
    Success,
    /// This one message (its topic, payload, parameters or quota); the destination may be fine.
    Message,
    /// The destination or consumer group the message went to: its state in `/api/v1/health`.
    Destination,
    /// One consumer's connection to the endpoint.
    Connection,
}

/// What one code means, when iotfwd logs it, and what an operator should do about it.
///
/// All texts are single-line prose; [`render_one`] wraps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeInfo {
    /// The number, e.g. 9307.
    pub code: u16,
    /// The [`Code`] variant's name, e.g. `"SqlError"`.
    pub name: &'static str,
    /// The service type this code is logged under (for 200, see [`CodeInfo::biz_codes`]).
    pub biz_code: BizCode,
    /// What a failure with this code says something about: the one message, or the
    /// destination (health tracks only the latter).
    pub scope: Scope,
    /// When iotfwd logs it, in one line.
    pub situation: &'static str,
    /// The platform's meaning of the code.
    pub meaning: &'static str,
    /// Why it happens, worded for iotfwd.
    pub cause: &'static str,
    /// Concrete steps for an iotfwd operator.
    pub troubleshooting: &'static str,
}

impl CodeInfo {
    /// The [`Code`] this entry describes.
    pub fn as_code(&self) -> Code {
        Code::from_u16(self.code).expect("every catalog entry is a Code")
    }

    /// Every service type the code is logged under: all of them for 200, else just
    /// [`CodeInfo::biz_code`].
    pub fn biz_codes(&self) -> &[BizCode] {
        if self.code == Code::Ok.as_u16() {
            &BizCode::ALL
        } else {
            std::slice::from_ref(&self.biz_code)
        }
    }

    /// The service type as the renderers print it: "any" for 200, else the bizCode.
    fn service_type_label(&self) -> &'static str {
        if self.biz_codes().len() > 1 {
            "any"
        } else {
            self.biz_code.as_str()
        }
    }
}

/// The whole catalog, ascending by code, one entry per [`Code`] variant.
pub fn catalog() -> &'static [CodeInfo] {
    CATALOG
}

/// The catalog entry for a number, if iotfwd knows the code.
pub fn lookup(code: u16) -> Option<&'static CodeInfo> {
    Code::from_u16(code).map(Code::info)
}

/// `iotfwd codes` output: a header, then one aligned line per code: code, service type,
/// meaning.
pub fn render_catalog() -> String {
    let code_width = CATALOG
        .iter()
        .map(|i| i.code.to_string().len())
        .chain(["CODE".len()])
        .max()
        .unwrap_or(0);
    let service_width = CATALOG
        .iter()
        .map(|i| i.service_type_label().len())
        .chain(["SERVICE TYPE".len()])
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let mut line = |code: &str, service: &str, meaning: &str| {
        let row = format!("{code:<code_width$}  {service:<service_width$}  {meaning}");
        out.push_str(row.trim_end());
        out.push('\n');
    };
    line("CODE", "SERVICE TYPE", "MEANING");
    for info in CATALOG {
        line(
            &info.code.to_string(),
            info.service_type_label(),
            info.meaning,
        );
    }
    out
}

/// The width `render_one` wraps its paragraphs at.
const WRAP_WIDTH: usize = 100;
/// The indentation of `render_one`'s paragraphs.
const INDENT: &str = "  ";

/// `iotfwd codes 9307` output: a title line (`9307  SqlError  (ruleengine)`), then the
/// "Meaning:", "When:", "Cause:" and "Troubleshooting:" paragraphs, indented and wrapped at
/// 100 columns.
pub fn render_one(info: &CodeInfo) -> String {
    let mut out = format!(
        "{}  {}  ({})\n",
        info.code,
        info.name,
        if info.biz_codes().len() > 1 {
            "any service type"
        } else {
            info.biz_code.as_str()
        }
    );
    for (heading, text) in [
        ("Meaning:", info.meaning),
        ("When:", info.situation),
        ("Cause:", info.cause),
        ("Troubleshooting:", info.troubleshooting),
    ] {
        out.push('\n');
        out.push_str(heading);
        out.push('\n');
        crate::text::wrap_into(&mut out, text, INDENT, WRAP_WIDTH);
    }
    out
}

/// Builds one entry; `code` and `name` come from the variant so they cannot disagree. One
/// argument per column of the catalog.
#[allow(clippy::too_many_arguments)]
const fn entry(
    code: Code,
    name: &'static str,
    biz_code: BizCode,
    scope: Scope,
    situation: &'static str,
    meaning: &'static str,
    cause: &'static str,
    troubleshooting: &'static str,
) -> CodeInfo {
    CodeInfo {
        code: code.as_u16(),
        name,
        biz_code,
        scope,
        situation,
        meaning,
        cause,
        troubleshooting,
    }
}

// `Code::info` indexes `CATALOG` by the position in `Code::ALL`: the two must line up.
const _: () = {
    assert!(CATALOG.len() == Code::ALL.len());
    let mut i = 0;
    while i < CATALOG.len() {
        assert!(CATALOG[i].code == Code::ALL[i].as_u16());
        if i > 0 {
            assert!(CATALOG[i - 1].code < CATALOG[i].code);
        }
        i += 1;
    }
};

use BizCode::{RuleEngine, ServerSubscribe, Uplink};

static CATALOG: &[CodeInfo] = &[
    entry(
        Code::Ok,
        "Ok",
        Uplink,
        Scope::Success,
        "A step succeeded: a message was accepted from a source (uplink), a rule action's \
         publish was confirmed by the destination (ruleengine), or a consumer accepted a \
         delivery (ServerSubscribe).",
        "Success.",
        "The step completed normally.",
        "Nothing to fix. To follow the message through its later steps, query `iotfwd logs` by \
         its traceId or messageId. If nothing follows its uplink record, no rule matched it: run \
         `iotfwd rules test` with the message's topic and payload to check the rules' FROM topic \
         filters and WHERE conditions.",
    ),
    entry(
        Code::TopicInvalid,
        "TopicInvalid",
        Uplink,
        Scope::Message,
        "A source delivered a message whose topic is not of the form \
         /productKey/deviceName/...; no rule evaluates it.",
        "Incorrect topic format.",
        "The message topic format is incorrect. iotfwd takes the productKey and deviceName from \
         the first two levels of the topic (/${productKey}/${deviceName}/..., e.g. \
         /a1b2c3/sensor-01/thing/event/property/post), so a topic that is empty, does not start \
         with '/', or lacks either of those levels cannot be attributed to a device.",
        "Look at the record's operation (the topic as received). Fix the publisher, or the \
         source's envelope, so the topic is /productKey/deviceName/... with both levels \
         non-empty. Resend one message with `iotfwd send` to the corrected topic and confirm a \
         200 uplink record in `iotfwd logs`.",
    ),
    entry(
        Code::ConsumerOffline,
        "ConsumerOffline",
        ServerSubscribe,
        Scope::Destination,
        "A rule forwarded a message to a consumer group that has no consumer online; the \
         message waits in the group's backlog.",
        "The service subscription endpoint is offline.",
        "When the message was forwarded to the consumer group, no AMQP 1.0 client of that group \
         was connected to iotfwd's [subscription] endpoint. The message is not dropped: it waits \
         in the group's backlog (a durable RabbitMQ queue when a broker is configured, bounded \
         memory otherwise) until a consumer of the group connects or the retention ends.",
        "Confirm that your AMQP 1.0 consumer for the group is running and connected to the \
         [subscription] listen address with the group's credentials; its own log shows \
         connection or SASL errors. Check that the rule's [[action]] group names the group the \
         consumer attaches to. `iotfwd consume` connects a test consumer to the group and drains \
         the backlog.",
    ),
    entry(
        Code::SqlError,
        "SqlError",
        RuleEngine,
        Scope::Message,
        "A rule's SQL does not parse or plan (the rule is not loaded; every other rule keeps \
         running), or a function got runtime arguments it cannot use, e.g. topic(0) (that \
         message fails for that rule).",
        "SQL statement parsing failed.",
        "The rule's SQL does not conform to the rules-engine dialect (SELECT ... FROM \"<topic \
         filter>\" [WHERE ...]) or cannot be planned: a syntax error, an unknown function or \
         column type, a malformed topic filter. Or, at run time, a function's arguments do not \
         fit its usage, e.g. topic(0) (levels count from 1) or a timestamp() format it cannot \
         use.",
        "Run `iotfwd check`: it loads every rule file and prints each SQL error with the rule's \
         name. Fix the rule's sql, then run `iotfwd rules test` with the failing message's topic \
         and payload; it uses the daemon's engine, so it shows the same result or error. For a \
         runtime error, the record's reason names the function; check its arguments (topic(n) \
         is 1-based).",
    ),
    entry(
        Code::PayloadInvalid,
        "PayloadInvalid",
        RuleEngine,
        Scope::Message,
        "A rule that reads payload fields matched the message's topic, but the payload is not \
         valid JSON or not a JSON object.",
        "Invalid payload.",
        "The format of the message body sent by the device is invalid: the rule reads payload \
         fields (or *), so the payload must be a UTF-8 JSON object, and this one is not valid \
         JSON (truncated, binary, wrong encoding) or is a JSON array or scalar instead of an \
         object.",
        "Look at the record's content (the payload as received). Fix the device or the source \
         so it sends a JSON object, e.g. {\"items\":{\"temperature\":{\"value\":40}}}, then \
         confirm with `iotfwd rules test` on that payload.",
    ),
    entry(
        Code::ParamInvalid,
        "ParamInvalid",
        RuleEngine,
        Scope::Message,
        "An action's parameters resolved to something invalid, e.g. its routing key template \
         ${key} names a key the rule's SELECT does not produce, or resolves to an empty routing \
         key.",
        "Invalid parameter.",
        "The parameters passed to the destination are invalid. An action's templates (e.g. \
         routing_key = \"temp.${device}\") are filled from the rule's result, and here a \
         placeholder names a key the SELECT does not produce, the key was NULL for this message, \
         or the result is not a usable value (an empty routing key, or one longer than 255 \
         bytes).",
        "Compare the templated parameters of the rule's [[action]] (and [error_action]), such \
         as routing_key, with the SELECT: every ${key} must be a select item's alias or field \
         name. Run `iotfwd rules test` on the message to see the result object the templates \
         are filled from. For fields that can be missing, give the select item a default with \
         coalesce(...), then `iotfwd check`. With quotas on, 9321 also means the message's \
         productKey is in no [[instance]] products list while [quota] unmapped = \"refuse\": \
         add the product to an instance, or set unmapped = \"default_instance\".",
    ),
    entry(
        Code::Throttled,
        "Throttled",
        RuleEngine,
        Scope::Message,
        "A tenant or a device is over its forwarding quota; the forward is refused for that \
         message.",
        "Throttling.",
        "Too many forwarding requests from the device or tenant: the tenant's forwarding rate \
         exceeded its [[tenant]] forward_tps (plus burst), or the device exceeded its per-device \
         quota, and the limiter refused the forward.",
        "The record's reason names the quota that was hit and its value; tenantId and \
         deviceName say whose. Reduce the message sending frequency of that device or tenant, \
         or raise the quota in the daemon config: forward_tps and burst of the matching \
         [[tenant]], or [quota.device] (and its per-product overrides \
         [quota.device.products.<productKey>]). To smooth short bursts instead of failing them, \
         set on_limit = \"wait\" with a max_wait_ms on that quota. Check the config with \
         `iotfwd check` and restart the daemon. Throttled messages go to the rule's \
         [error_action]. Quotas are per iotfwd process, so N processes together allow up to N \
         times the configured rate.",
    ),
    entry(
        Code::DestinationUnavailable,
        "DestinationUnavailable",
        RuleEngine,
        Scope::Destination,
        "The destination RabbitMQ broker or exchange stayed unreachable through every publish \
         retry.",
        "The data forwarding service is unavailable.",
        "The destination of the forward is unavailable: the RabbitMQ broker at the [broker] url \
         could not be reached, or its connection or channel kept failing (broker stopped, \
         network or DNS trouble, TLS failure, or the broker blocking publishers on a memory or \
         disk alarm), until all retries were used up.",
        "Check that the broker is running and reachable from the iotfwd host at the [broker] \
         url (host, port, vhost). On the broker, `rabbitmq-diagnostics status` and \
         `rabbitmq-diagnostics alarms` show whether it is up and whether a resource alarm \
         blocks publishers. Check iotfwd's /readyz and its log for connection errors. Failed \
         messages went to the rule's [error_action] if it has one; new messages flow again once \
         the broker is back.",
    ),
    entry(
        Code::InstanceSpecExceeded,
        "InstanceSpecExceeded",
        RuleEngine,
        Scope::Message,
        "The instance is over its forwarding-TPS specification ([[instance]] forward_tps); the \
         forward is refused for that message.",
        "The resource specifications of the instance are exceeded.",
        "The resource specification of the instance, here its message forwarding TPS \
         ([[instance]] forward_tps), no longer meets the traffic: all tenants and devices of \
         the instance together forward more messages per second than it allows.",
        "The record's instanceId names the instance. Compare its forwarding rate on /metrics \
         with forward_tps of that [[instance]] in the daemon config; if the traffic is expected, \
         raise forward_tps (the instance's specification), check with `iotfwd check` and \
         restart. Otherwise find the tenant or device driving it with `iotfwd logs` for that \
         instanceId. Quotas are per iotfwd process today.",
    ),
    entry(
        Code::DestinationError,
        "DestinationError",
        RuleEngine,
        Scope::Destination,
        "The destination refused the message: RabbitMQ nacked the publish (publisher confirm) \
         or closed the channel with an error.",
        "Internal error in the destination for message forwarding.",
        "An internal error occurred in the destination: RabbitMQ answered the publish with a \
         nack (e.g. a bound queue reached its max-length with overflow reject-publish, or a \
         quorum queue has no leader) or closed the channel with an AMQP error other than 403 or \
         404.",
        "Read the reply code and text in the record's reason and look them up in RabbitMQ's \
         documentation (AMQP 0-9-1 reply codes such as 406 PRECONDITION_FAILED or 506 \
         RESOURCE_ERROR). Check the broker's log and the queues bound to the action's exchange: \
         `rabbitmqctl list_queues name messages consumers` and their policies (max-length, \
         overflow). The message went to the rule's [error_action] if it has one.",
    ),
    entry(
        Code::DestinationMisconfigured,
        "DestinationMisconfigured",
        RuleEngine,
        Scope::Destination,
        "The destination is misconfigured: the action's exchange does not exist (404 \
         NOT_FOUND).",
        "Abnormal destination configuration.",
        "The forwarding rule's destination is configured incorrectly, so the publish failed: \
         the exchange named by the action's exchange (or by the [error_action]'s) does not exist \
         in the broker's vhost, and RabbitMQ closed the channel with 404 NOT_FOUND.",
        "Check that the rule's [[action]] exchange (and its [error_action] exchange) exists on \
         the broker, in the vhost of the [broker] url: `rabbitmqctl list_exchanges -p <vhost> \
         name type`. Declare the exchange (and bind queues to it), or fix the name in the rule \
         file and run `iotfwd check`.",
    ),
    entry(
        Code::DestinationAuth,
        "DestinationAuth",
        RuleEngine,
        Scope::Destination,
        "The destination refused iotfwd's credentials or permissions: RabbitMQ answered 403 \
         ACCESS_REFUSED.",
        "Destination authorization error.",
        "The permissions that allow iotfwd to access the destination are incorrect: the broker \
         user of the [broker] url failed to log in, or lacks write permission on the action's \
         exchange in that vhost, so RabbitMQ refused with 403 ACCESS_REFUSED.",
        "Check the broker user's permissions: `rabbitmqctl list_user_permissions <user>` must \
         show, for the vhost of the [broker] url, a write pattern matching the action's \
         exchange (and configure/read where iotfwd declares queues); `rabbitmqctl \
         authenticate_user <user> <password>` checks the password. The guest user can only \
         connect from localhost. Grant with `rabbitmqctl set_permissions -p <vhost> <user> \
         <configure> <write> <read>`.",
    ),
    entry(
        Code::Internal,
        "Internal",
        RuleEngine,
        Scope::Destination,
        "An unexpected internal error in iotfwd, caused neither by the message nor by the \
         destination.",
        "Unknown internal server error.",
        "Internal error in iotfwd: a step failed in a way no other code describes, e.g. a task \
         panicked or an internal channel closed unexpectedly. This is a bug, not a \
         configuration problem.",
        "Search iotfwd's own log (its tracing output) around the record's time for the \
         record's traceId and the error next to it; RUST_BACKTRACE=1 adds a backtrace to \
         panics. Reproduce with `iotfwd rules test` on the same message if it involves a rule. \
         Report it as a bug with the record, the rule file, the config (without secrets) and \
         the iotfwd version.",
    ),
    entry(
        Code::GroupConnectionLimit,
        "GroupConnectionLimit",
        ServerSubscribe,
        Scope::Connection,
        "A client tried to connect to a consumer group that already has max_connections \
         connections; the endpoint closed the new connection.",
        "The number of connections for a single consumer group exceeds the limit.",
        "Too many connections: the consumer group already has as many client connections as \
         its max_connections allows, so iotfwd's AMQP 1.0 [subscription] endpoint closed the \
         new one.",
        "Purge excess connections: look for consumers that reconnect without closing their old \
         connection, or more consumer instances than intended for the group. If the group \
         really needs more consumers, raise its max_connections in the daemon config, check \
         with `iotfwd check` and restart.",
    ),
    entry(
        Code::HeartbeatInvalid,
        "HeartbeatInvalid",
        ServerSubscribe,
        Scope::Connection,
        "A client opened a connection with a heartbeat (AMQP idle-time-out) outside 30000 to \
         300000 ms; the endpoint closed it.",
        "The heartbeat value does not meet the requirements.",
        "The heartbeat value does not meet the requirements: iotfwd's [subscription] endpoint \
         accepts a client idle-time-out from 30000 to 300000 ms (30 to 300 s), and the \
         client's Open frame carried a value outside that range.",
        "Set the consumer's heartbeat so that the idle-time-out it sends is within 30000 to \
         300000 ms. Many clients send half of their configured heartbeat: Qpid Proton with \
         heartbeat=60 advertises 30000 ms, so heartbeat=30 (15000 ms) is refused.",
    ),
    entry(
        Code::ServerClosed,
        "ServerClosed",
        ServerSubscribe,
        Scope::Connection,
        "iotfwd's AMQP 1.0 endpoint closed a client's connection itself (shutdown, restart or \
         rebalancing).",
        "The server disconnected the connection.",
        "A shutdown, restart or rebalancing of iotfwd's [subscription] endpoint can trigger \
         this: the daemon closed the consumer's connection. Deliveries the consumer had not \
         settled stay in the group's backlog and are delivered again. The consumer must \
         implement reconnection logic; this generally has no impact on your service.",
        "Make sure the consumer reconnects with backoff (e.g. Qpid Proton's reconnect option) \
         and handles redelivered messages idempotently. Check iotfwd's log at that time for a \
         shutdown or restart; repeated 9602 without one means the daemon closed connections for \
         a reason its log states.",
    ),
    entry(
        Code::AckTimeout,
        "AckTimeout",
        ServerSubscribe,
        Scope::Destination,
        "A consumer did not settle a delivery (accept, release or reject) within the ACK \
         time-out (ack_timeout, 30 s by default).",
        "Message ACK timed out. A response was not received from the accepter.",
        "The consumer timed out when replying with an ACK: it received the message but sent no \
         disposition within ack_timeout, because its processing is slow or stuck, it is \
         overloaded, or its code never settles some deliveries.",
        "Troubleshoot the consumer's message processing: time its handler, look for blocking \
         calls, and make sure every delivery is accepted, released or rejected. Lower its \
         prefetch (link credit) so it holds no more messages than it can process within \
         ack_timeout, or add consumers to the group (up to max_connections). Raise ack_timeout \
         in the daemon config only if processing legitimately takes longer.",
    ),
    entry(
        Code::Released,
        "Released",
        ServerSubscribe,
        Scope::Destination,
        "The consumer settled a delivery as released: it gave the message back without \
         processing it.",
        "The accepter replied with an ACK release message.",
        "The consumer replied with the AMQP 1.0 outcome released: it did not process the \
         message (e.g. it was shutting down, or could not take it right now), so by AMQP \
         semantics the message may be delivered again.",
        "Check why the consumer releases messages: find where its code settles a delivery as \
         released (e.g. Qpid Proton's release()) and on which errors or back-pressure it does \
         so. A consumer that releases everything causes a redelivery loop: accept what it has \
         processed and reject what it never can.",
    ),
    entry(
        Code::Rejected,
        "Rejected",
        ServerSubscribe,
        Scope::Destination,
        "The consumer settled a delivery as rejected (NACK).",
        "The accepter replied with a NACK.",
        "The consumer replied with the AMQP 1.0 outcome rejected: it refused the message, \
         usually because it could not parse or process it. By AMQP semantics a rejected \
         message is not delivered again.",
        "Look in the consumer's log for why it rejected the message; the rejection's error \
         condition and description, if the consumer sent one, are in the record's reason. \
         Compare the message (find it with `iotfwd logs` by messageId) with what the consumer \
         expects, e.g. a field the rule's SELECT does not produce, and check the rule's output \
         with `iotfwd rules test`.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_has_exactly_one_entry_and_round_trips() {
        for &code in Code::ALL {
            assert_eq!(Code::from_u16(code.as_u16()), Some(code));
            let entries: Vec<_> = catalog()
                .iter()
                .filter(|i| i.code == code.as_u16())
                .collect();
            assert_eq!(entries.len(), 1, "{code:?} must have exactly one entry");
            assert_eq!(code.info().code, code.as_u16());
            assert_eq!(code.info().as_code(), code);
            assert_eq!(code.info().name, format!("{code:?}"));
            assert_eq!(lookup(code.as_u16()), Some(code.info()));
        }
        assert_eq!(catalog().len(), Code::ALL.len());
    }

    #[test]
    fn code_all_lists_every_variant() {
        // A new variant missing from ALL has no catalog entry; this match fails to compile
        // when a variant is added, pointing here.
        for &code in Code::ALL {
            match code {
                Code::Ok
                | Code::TopicInvalid
                | Code::ConsumerOffline
                | Code::SqlError
                | Code::PayloadInvalid
                | Code::ParamInvalid
                | Code::Throttled
                | Code::DestinationUnavailable
                | Code::InstanceSpecExceeded
                | Code::DestinationError
                | Code::DestinationMisconfigured
                | Code::DestinationAuth
                | Code::Internal
                | Code::GroupConnectionLimit
                | Code::HeartbeatInvalid
                | Code::ServerClosed
                | Code::AckTimeout
                | Code::Released
                | Code::Rejected => {}
            }
        }
        let distinct: HashSet<_> = Code::ALL.iter().collect();
        assert_eq!(distinct.len(), 19);
    }

    #[test]
    fn unknown_numbers_are_not_codes() {
        for n in [0, 199, 201, 404, 9200, 9308, 9653, u16::MAX] {
            assert_eq!(Code::from_u16(n), None, "{n}");
            assert!(lookup(n).is_none(), "{n}");
        }
    }

    #[test]
    fn catalog_is_sorted_and_unique() {
        assert!(catalog().windows(2).all(|w| w[0].code < w[1].code));
        assert!(Code::ALL.windows(2).all(|w| w[0] < w[1]));
        let names: HashSet<_> = catalog().iter().map(|i| i.name).collect();
        assert_eq!(names.len(), catalog().len());
    }

    #[test]
    fn no_entry_has_empty_or_multiline_text() {
        for info in catalog() {
            for (field, text) in [
                ("situation", info.situation),
                ("meaning", info.meaning),
                ("cause", info.cause),
                ("troubleshooting", info.troubleshooting),
            ] {
                assert!(!text.trim().is_empty(), "{} {field} is empty", info.code);
                assert!(!text.contains('\n'), "{} {field} has a newline", info.code);
                assert!(
                    !text.contains("  "),
                    "{} {field} has a double space",
                    info.code
                );
                assert!(
                    text.ends_with('.'),
                    "{} {field} is not a sentence",
                    info.code
                );
            }
        }
    }

    #[test]
    fn only_ok_is_success() {
        for &code in Code::ALL {
            assert_eq!(code.is_success(), code == Code::Ok, "{code:?}");
        }
    }

    #[test]
    fn biz_codes_follow_the_design_table() {
        use BizCode::*;
        let expected = [
            (1903, Uplink),
            (9203, ServerSubscribe),
            (9307, RuleEngine),
            (9320, RuleEngine),
            (9321, RuleEngine),
            (9324, RuleEngine),
            (9325, RuleEngine),
            (9326, RuleEngine),
            (9331, RuleEngine),
            (9332, RuleEngine),
            (9333, RuleEngine),
            (9399, RuleEngine),
            (9600, ServerSubscribe),
            (9601, ServerSubscribe),
            (9602, ServerSubscribe),
            (9650, ServerSubscribe),
            (9651, ServerSubscribe),
            (9652, ServerSubscribe),
        ];
        for (code, biz) in expected {
            let info = lookup(code).unwrap();
            assert_eq!(info.biz_code, biz, "{code}");
            assert_eq!(info.biz_codes(), &[biz], "{code}");
        }
        assert_eq!(Code::Ok.info().biz_codes(), &BizCode::ALL);
    }

    #[test]
    fn only_message_scoped_codes_leave_destination_health_alone() {
        let message: Vec<u16> = Code::ALL
            .iter()
            .filter(|c| c.scope() == Scope::Message)
            .map(|c| c.as_u16())
            .collect();
        assert_eq!(message, [1903, 9307, 9320, 9321, 9324, 9326]);
        assert_eq!(Code::Ok.scope(), Scope::Success);
        assert_eq!(Code::ServerClosed.scope(), Scope::Connection);
        assert_eq!(Code::DestinationUnavailable.scope(), Scope::Destination);
    }

    #[test]
    fn display_is_the_number() {
        assert_eq!(Code::SqlError.to_string(), "9307");
        assert_eq!(Code::Ok.to_string(), "200");
    }

    #[test]
    fn render_one_has_every_paragraph() {
        let normalize = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        for info in catalog() {
            let out = render_one(info);
            let flat = normalize(&out);
            for text in [
                info.meaning,
                info.situation,
                info.cause,
                info.troubleshooting,
            ] {
                assert!(flat.contains(&normalize(text)), "{}: {text}", info.code);
            }
            for heading in ["Meaning:", "When:", "Cause:", "Troubleshooting:"] {
                assert!(out.lines().any(|l| l == heading), "{} {heading}", info.code);
            }
            for line in out.lines() {
                let longest_word = crate::text::unbreakable_words(line.trim_start())
                    .iter()
                    .map(|t| t.chars().count())
                    .max()
                    .unwrap_or(0);
                assert!(
                    line.chars().count() <= WRAP_WIDTH || longest_word + INDENT.len() > WRAP_WIDTH,
                    "{}: line too long: {line}",
                    info.code
                );
            }
        }
        let sql = render_one(Code::SqlError.info());
        assert!(sql.starts_with("9307  SqlError  (ruleengine)\n"), "{sql}");
        assert!(render_one(Code::Ok.info()).starts_with("200  Ok  (any service type)\n"));
    }

    #[test]
    fn render_catalog_is_one_aligned_line_per_code() {
        let out = render_catalog();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), catalog().len() + 1);
        assert!(lines[0].starts_with("CODE"));
        let meaning_column = lines[0].find("MEANING").unwrap();
        for (line, info) in lines[1..].iter().zip(catalog()) {
            assert!(line.starts_with(&info.code.to_string()), "{line}");
            assert_eq!(&line[meaning_column..], info.meaning, "{line}");
            assert!(line.contains(info.service_type_label()), "{line}");
        }
        assert!(out.contains("9307  "));
        assert!(lines[1].contains(" any "), "{}", lines[1]);
    }

    #[test]
    fn code_serializes_as_a_number() {
        assert_eq!(serde_json::to_string(&Code::SqlError).unwrap(), "9307");
        for &code in Code::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, code.as_u16().to_string());
            assert_eq!(serde_json::from_str::<Code>(&json).unwrap(), code);
        }
        assert!(serde_json::from_str::<Code>("9308").is_err());
        assert!(serde_json::from_str::<Code>("70000").is_err());
        assert!(serde_json::from_str::<Code>("\"9307\"").is_err());
    }

    #[test]
    fn biz_code_names_and_parse() {
        for biz in BizCode::ALL {
            assert_eq!(BizCode::parse(biz.as_str()), Some(biz));
            assert_eq!(BizCode::parse(&biz.as_str().to_uppercase()), Some(biz));
            assert_eq!(biz.to_string(), biz.as_str());
            let json = serde_json::to_string(&biz).unwrap();
            assert_eq!(json, format!("\"{}\"", biz.as_str()));
            assert_eq!(serde_json::from_str::<BizCode>(&json).unwrap(), biz);
        }
        assert_eq!(BizCode::parse("ruleengine"), Some(BizCode::RuleEngine));
        assert_eq!(BizCode::parse("RuleEngine"), Some(BizCode::RuleEngine));
        assert_eq!(
            BizCode::parse("serversubscribe"),
            Some(BizCode::ServerSubscribe)
        );
        assert_eq!(BizCode::parse("Uplink"), Some(BizCode::Uplink));
        assert_eq!(BizCode::parse(""), None);
        assert_eq!(BizCode::parse("rule_engine"), None);
        assert_eq!(BizCode::parse(" uplink"), None);
    }

    #[test]
    fn code_info_serializes_with_platform_field_names() {
        let json = serde_json::to_value(Code::Throttled.info()).unwrap();
        assert_eq!(json["code"], 9324);
        assert_eq!(json["name"], "Throttled");
        assert_eq!(json["bizCode"], "ruleengine");
    }
}
