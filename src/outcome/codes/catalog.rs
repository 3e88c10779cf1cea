//! The catalog's text: one entry per code, with the platform's meaning and the cause and
//! troubleshooting worded for an iotfwd operator.
//!
//! Kept apart from the types and renderers in [`super`] because it is data, most of it prose that
//! changes with the reference and the product, not with the code; a compile-time check below
//! keeps it in step with [`Code::ALL`].

use super::{BizCode, Code, CodeInfo, Scope};

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

pub(super) static CATALOG: &[CodeInfo] = &[
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
         messages went to the rule's [error_action] if it has one, else to the dead-letter \
         queue (`iotfwd dlq list`); new messages flow again once the broker is back, and \
         `iotfwd dlq replay` sends the dead-lettered ones.",
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
         overflow). The message went to the rule's [error_action] if it has one, else to the \
         dead-letter queue (`iotfwd dlq list`, `iotfwd dlq replay` after the fix).",
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
         so. A consumer that releases everything gets each message `max_redeliveries` times \
         (default 16), after which it is dead-lettered with 9651 (`iotfwd dlq list --code \
         9651`): accept what it has processed and reject what it never can.",
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
    use super::super::{catalog, lookup};
    use super::*;
    use std::collections::HashSet;

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
}
