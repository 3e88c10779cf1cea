//! Prometheus metrics and tracing setup.
//!
//! Every metric the daemon exports is declared here, once: names, help texts and labels. The
//! counters are built to balance, and tests check it:
//! - per rule: `iotfwd_rule_matched_total = iotfwd_rule_passed_total + iotfwd_rule_no_result_total
//!   + sum by code of iotfwd_rule_failed_total`;
//! - per action: `iotfwd_action_executions_total = iotfwd_action_success_total + sum by code of
//!   iotfwd_action_failed_total + iotfwd_action_in_flight`.
//!
//! A reload never resets them: series are keyed by rule name, so a changed rule keeps counting
//! in the same series, and a removed rule's series stay (frozen) until the process restarts,
//! which keeps `rate()` and the balances right for messages that were still in flight.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The daemon's metrics. One instance per daemon (not a global), so tests can run several.
pub struct Metrics {
    pub registry: Registry,
    /// Messages taken in, by source (`http`, `amqp`, `mqtt`).
    pub messages_received: IntCounterVec,
    /// Every outcome record, by service type and code.
    pub outcomes: IntCounterVec,
    /// Messages whose topic matched a rule's FROM filter (the rule ran on them).
    pub rule_matched: IntCounterVec,
    /// Matched messages for which WHERE was true (an output was produced).
    pub rule_passed: IntCounterVec,
    /// Matched messages for which WHERE was false or NULL.
    pub rule_no_result: IntCounterVec,
    /// Matched messages the rule failed on, by code (9307, 9320).
    pub rule_failed: IntCounterVec,
    /// Messages per evaluated micro-batch.
    pub batch_size: Histogram,
    /// Time to evaluate one micro-batch, in seconds.
    pub batch_eval_seconds: Histogram,
    /// Rules currently loaded.
    pub rules_loaded: IntGauge,
    /// Compiled type variants per rule (payload fields arriving with different JSON types).
    pub rule_variants: IntGaugeVec,
    /// Forwards refused by a quota, by `tenant`, `iot_instance` and `scope` (`device`,
    /// `tenant`, `instance`): 9324 for device and tenant, 9326 for instance. The IoT instance
    /// is `iot_instance`, not `instance`: Prometheus owns the target labels `instance` and
    /// `job`, and no iotfwd metric uses them.
    pub throttled: IntCounterVec,
    /// Constant 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// Action executions started, by rule and action (destination).
    pub action_executions: IntCounterVec,
    /// Actions that reached 200.
    pub action_success: IntCounterVec,
    /// Actions that failed for good, by code.
    pub action_failed: IntCounterVec,
    /// Retries (attempts after the first) of actions.
    pub action_retries: IntCounterVec,
    /// Dead-letter queue writes, by rule and result: `written` (the message waits in the
    /// queue), `failed` (the write failed; the source redelivers), `replayed` (a replay
    /// delivered it and it left the queue), `replay_failed` (a replay failed; it stays).
    pub dead_letters: IntCounterVec,
    /// Actions started and not yet terminal.
    pub action_in_flight: IntGaugeVec,
    /// 1 while the broker is connected, 0 otherwise. Absent without `[broker]`: not in the
    /// registry until [`Metrics::export_broker_gauges`] (the daemon calls it when a broker
    /// is configured); setting it before that is harmless and shows nowhere.
    pub broker_connected: IntGauge,
    /// 1 while the broker blocks publishers (connection.blocked: a memory or disk alarm).
    /// Exported with `broker_connected`.
    pub broker_blocked: IntGauge,
    /// 1 while the shared quota backend (Redis) answers, 0 while it does not; exported only
    /// with `[quota] backend = "redis"` ([`Metrics::export_quota_backend_gauge`]).
    pub quota_backend_up: IntGauge,
    /// 1 while the MQTT broker of `[source.mqtt]` is connected, 0 otherwise. Absent without
    /// `[source.mqtt]`: registered by [`Metrics::export_mqtt_gauge`].
    pub mqtt_connected: IntGauge,
    /// Seconds from a message's receipt to each of its actions' delivery (200), error actions
    /// excluded.
    pub forward_latency: Histogram,
    /// Rule reloads after start, by result (`success`, `failure`: some rule file did not load).
    pub rules_reload: IntCounterVec,
    /// 1 when the last load of the rules directory (at start or a reload) loaded every file.
    pub rules_last_reload_success: IntGauge,
    /// When the last load of the rules directory ran, in seconds since the Unix epoch.
    pub rules_last_reload_timestamp: Gauge,
    /// Identity overrides a source did not trust and ignored (AMQP headers without
    /// `source.amqp.trust_identity_headers`, HTTP envelope fields without the scope
    /// `ingest:any-identity`), by source: the message went on with the topic's identity.
    pub identity_override_ignored: IntCounterVec,
    /// HTTP requests refused by the API's authentication, by token name (`-` when no token
    /// was given or none matched) and reason (`missing`, `invalid`, `scope`). Never by value.
    pub http_auth_refused: IntCounterVec,
    /// HTTP requests refused by a bound on work per client, by the limit that refused them
    /// (`max_concurrent_ingest`, `max_concurrent_queries`: 429; `query_timeout_ms`: 503;
    /// `body_timeout_ms`: 408).
    pub http_limited: IntCounterVec,
    /// The consumer groups' metrics (label `group`).
    pub groups: GroupMetrics,
    /// The record store's metrics.
    pub store: StoreMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let build_info = gauge_vec(
            r,
            "iotfwd_build_info",
            "Constant 1, labelled with the iotfwd version.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let rules_reload = counter_vec(
            r,
            "iotfwd_rules_reload_total",
            "Reloads of the rules directory after start, by result (failure: some rule file did not load).",
            &["result"],
        );
        for result in ["success", "failure"] {
            rules_reload.with_label_values(&[result]);
        }
        Metrics {
            messages_received: counter_vec(
                r,
                "iotfwd_messages_received_total",
                "Messages taken in, by source.",
                &["source"],
            ),
            outcomes: counter_vec(
                r,
                "iotfwd_outcomes_total",
                "Outcome records written, by service type (bizCode) and status code.",
                &["biz_code", "code"],
            ),
            rule_matched: counter_vec(
                r,
                "iotfwd_rule_matched_total",
                "Messages whose topic matched the rule's FROM filter.",
                &["rule"],
            ),
            rule_passed: counter_vec(
                r,
                "iotfwd_rule_passed_total",
                "Matched messages for which WHERE held and an output was produced.",
                &["rule"],
            ),
            rule_no_result: counter_vec(
                r,
                "iotfwd_rule_no_result_total",
                "Matched messages for which WHERE was false or NULL.",
                &["rule"],
            ),
            rule_failed: counter_vec(
                r,
                "iotfwd_rule_failed_total",
                "Matched messages the rule failed on, by code.",
                &["rule", "code"],
            ),
            throttled: counter_vec(
                r,
                "iotfwd_throttled_total",
                "Forwards refused by a quota (9324 device or tenant, 9326 instance), by tenant, IoT instance (iot_instance) and scope.",
                &["tenant", "iot_instance", "scope"],
            ),
            batch_size: histogram(
                r,
                "iotfwd_batch_size",
                "Messages per evaluated micro-batch.",
                vec![1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0],
            ),
            batch_eval_seconds: histogram(
                r,
                "iotfwd_batch_eval_seconds",
                "Time to evaluate one micro-batch through every candidate rule.",
                prometheus::exponential_buckets(0.00005, 2.0, 16).expect("valid buckets"),
            ),
            rules_loaded: int_gauge(r, "iotfwd_rules_loaded", "Rules currently loaded."),
            rule_variants: gauge_vec(
                r,
                "iotfwd_rule_compiled_variants",
                "Compiled type variants of a rule (payload fields seen with different JSON types).",
                &["rule"],
            ),
            build_info,
            action_executions: counter_vec(
                r,
                "iotfwd_action_executions_total",
                "Action executions started, by rule and action.",
                &["rule", "action"],
            ),
            action_success: counter_vec(
                r,
                "iotfwd_action_success_total",
                "Actions delivered (200).",
                &["rule", "action"],
            ),
            action_failed: counter_vec(
                r,
                "iotfwd_action_failed_total",
                "Actions that failed for good, by code.",
                &["rule", "action", "code"],
            ),
            action_retries: counter_vec(
                r,
                "iotfwd_action_retries_total",
                "Retried attempts of actions (attempts after the first).",
                &["rule", "action"],
            ),
            dead_letters: counter_vec(
                r,
                "iotfwd_dead_letters_total",
                "Dead-letter queue events by rule: written, failed (the source redelivers), replayed, replay_failed.",
                &["rule", "result"],
            ),
            action_in_flight: gauge_vec(
                r,
                "iotfwd_action_in_flight",
                "Actions started and not yet terminal.",
                &["rule", "action"],
            ),
            // Registered by export_broker_gauges, only with a [broker].
            broker_connected: IntGauge::new(
                "iotfwd_broker_connected",
                "1 while the RabbitMQ broker is connected, else 0.",
            )
            .expect("valid metric"),
            broker_blocked: IntGauge::new(
                "iotfwd_broker_blocked",
                "1 while the RabbitMQ broker blocks publishers (connection.blocked: a memory or disk alarm), else 0.",
            )
            .expect("valid metric"),
            // Registered by export_mqtt_gauge, only with a [source.mqtt].
            mqtt_connected: IntGauge::new(
                "iotfwd_mqtt_connected",
                "1 while the MQTT broker of [source.mqtt] is connected, else 0.",
            )
            .expect("valid metric"),
            forward_latency: histogram(
                r,
                "iotfwd_forward_latency_seconds",
                "Time from a message's receipt to the delivery (200) of one of its actions.",
                prometheus::exponential_buckets(0.0005, 2.0, 17).expect("valid buckets"),
            ),
            rules_reload,
            rules_last_reload_success: int_gauge(
                r,
                "iotfwd_rules_last_reload_success",
                "1 when the last load of the rules directory loaded every rule file, else 0.",
            ),
            rules_last_reload_timestamp: register(
                r,
                Gauge::new(
                    "iotfwd_rules_last_reload_timestamp_seconds",
                    "When the rules directory was last loaded, in seconds since the Unix epoch.",
                )
                .expect("valid metric"),
            ),
            quota_backend_up: IntGauge::new(
                "iotfwd_quota_backend_up",
                "1 while the shared quota backend (Redis) answers, else 0 (forwards then follow [quota] on_backend_down).",
            )
            .expect("valid metric"),
            identity_override_ignored: counter_vec(
                r,
                "iotfwd_identity_override_ignored_total",
                "Identity overrides (productKey, deviceName, tenantId, instanceId) a source did not trust and ignored, by source.",
                &["source"],
            ),
            http_auth_refused: counter_vec(
                r,
                "iotfwd_http_auth_refused_total",
                "HTTP requests refused by authentication, by token name and reason (missing, invalid: 401; scope: 403).",
                &["token", "reason"],
            ),
            http_limited: counter_vec(
                r,
                "iotfwd_http_limited_total",
                "HTTP requests refused by a bound on work per client, by the config key of the limit.",
                &["limit"],
            ),
            groups: GroupMetrics::new(r),
            store: StoreMetrics::new(Some(r)),
            registry,
        }
    }

    /// Exports `iotfwd_broker_connected` (0 until the broker connects) and
    /// `iotfwd_broker_blocked`. Only for a daemon with a `[broker]`, so that a broker-less
    /// process has no such series (and `IotfwdBrokerDisconnected` cannot fire for it).
    /// Calling it again does nothing.
    pub fn export_broker_gauges(&self) {
        for gauge in [&self.broker_connected, &self.broker_blocked] {
            match self.registry.register(Box::new(gauge.clone())) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => panic!("broker gauge: {e}"),
            }
        }
    }

    /// Exports `iotfwd_quota_backend_up` (1 until a call to Redis fails). Only for a daemon
    /// with `[quota] backend = "redis"`. Calling it again does nothing.
    pub fn export_quota_backend_gauge(&self) {
        self.quota_backend_up.set(1);
        match self
            .registry
            .register(Box::new(self.quota_backend_up.clone()))
        {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => panic!("quota backend gauge: {e}"),
        }
    }

    /// Exports `iotfwd_mqtt_connected` (0 until the broker connects). Only for a daemon with a
    /// `[source.mqtt]`. Calling it again does nothing.
    pub fn export_mqtt_gauge(&self) {
        match self
            .registry
            .register(Box::new(self.mqtt_connected.clone()))
        {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => panic!("mqtt gauge: {e}"),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Sets up tracing: `format` is text or json; `filter` an EnvFilter directive, overridden by
/// `RUST_LOG` when set. Safe to call more than once (later calls are no-ops).
pub fn init_tracing(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")));
    use std::io::IsTerminal as _;
    // Colour only for a person at a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Registers `metric` in `registry` and returns it. Every metric name is registered once per
/// registry; a second registration is a programming error.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

/// Per-group metrics (label `group`).
#[derive(Clone)]
pub struct GroupMetrics {
    pub connections: IntGaugeVec,
    pub backlog: IntGaugeVec,
    pub unsettled: IntGaugeVec,
    pub delivered: IntCounterVec,
    pub outcomes: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub refused: IntCounterVec,
    /// Sockets the AMQP 1.0 endpoint closed before or at login, by reason
    /// ([`ENDPOINT_REFUSALS`]).
    pub endpoint_refused: IntCounterVec,
}

/// The reasons of `iotfwd_endpoint_refused_total`: `pending_full` (max_pending_connections
/// sockets already in their handshake), `pending_per_ip` (max_pending_per_ip from that IP),
/// `handshake_timeout` (handshake_timeout_ms passed), `auth_rate_limited` (that IP failed
/// max_auth_failures_per_ip logins within the minute), `replayed` (a login whose signature was
/// already used in the window), `max_connections` (a login beyond max_connections).
pub const ENDPOINT_REFUSALS: [&str; 6] = [
    "pending_full",
    "pending_per_ip",
    "handshake_timeout",
    "auth_rate_limited",
    "replayed",
    "max_connections",
];

impl GroupMetrics {
    fn new(r: &Registry) -> GroupMetrics {
        GroupMetrics {
            connections: gauge_vec(
                r,
                "iotfwd_group_connections",
                "Consumer connections of the group open on this process.",
                &["group"],
            ),
            backlog: gauge_vec(
                r,
                "iotfwd_group_backlog_messages",
                "Messages waiting for a consumer of the group (the broker queue's depth plus what this process holds).",
                &["group"],
            ),
            unsettled: gauge_vec(
                r,
                "iotfwd_group_unsettled_messages",
                "Deliveries out with consumers and not yet settled.",
                &["group"],
            ),
            delivered: counter_vec(
                r,
                "iotfwd_group_delivered_total",
                "Deliveries sent to consumers (redeliveries included).",
                &["group"],
            ),
            outcomes: counter_vec(
                r,
                "iotfwd_group_outcomes_total",
                "Settled deliveries by outcome: accepted, released, rejected, timeout.",
                &["group", "outcome"],
            ),
            auth_failures: counter_vec(
                r,
                "iotfwd_group_auth_failures_total",
                "Refused logins, by the group the client named (\"_unknown\" when it named none that exists).",
                &["group"],
            ),
            refused: counter_vec(
                r,
                "iotfwd_group_refused_total",
                "Connections refused after login, by code (9600 connection limit, 9601 idle time-out).",
                &["group", "code"],
            ),
            endpoint_refused: {
                let c = counter_vec(
                    r,
                    "iotfwd_endpoint_refused_total",
                    "Sockets the AMQP 1.0 endpoint closed before or at login, by reason: pending_full, pending_per_ip, handshake_timeout, auth_rate_limited, replayed, max_connections.",
                    &["reason"],
                );
                for reason in ENDPOINT_REFUSALS {
                    c.with_label_values(&[reason]);
                }
                c
            },
        }
    }
}

/// The record store's metrics.
#[derive(Clone)]
pub struct StoreMetrics {
    /// Records committed.
    pub written: IntCounter,
    /// Records the store could not write after retries.
    pub failed: IntCounter,
    /// Records deleted by retention.
    pub purged: IntCounter,
    /// Records dropped while a PostgreSQL store was unreachable (past `store.queue_capacity`).
    pub dropped: IntCounter,
    /// Whether the store's database answered its writer's last call (1) or not (0).
    pub backend_up: IntGauge,
    /// Records waiting for the writer.
    pub queued: IntGauge,
    /// How long a source message waited for its records' commit before its acknowledgement
    /// (`store.durability = "acked"`).
    pub ack_wait_seconds: Histogram,
    /// Source messages not acknowledged because their records could not be committed.
    pub acks_refused: IntCounter,
}

impl StoreMetrics {
    /// The store's metrics, registered in `registry` when there is one (the daemon's); a
    /// store opened by a command (`iotfwd logs`, `bench logs`) has none.
    pub fn new(registry: Option<&Registry>) -> StoreMetrics {
        let reg = |m: IntCounter| match registry {
            Some(r) => register(r, m),
            None => m,
        };
        let counter =
            |name: &str, help: &str| reg(IntCounter::new(name, help).expect("valid metric"));
        let queued = IntGauge::new(
            "iotfwd_store_queue_records",
            "Outcome records waiting for the record store writer (bounded by store.queue_capacity).",
        )
        .expect("valid metric");
        let ack_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "iotfwd_store_ack_wait_seconds",
                "How long a source message waited for its outcome records' commit before it was \
                 acknowledged (store.durability = \"acked\").",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        StoreMetrics {
            ack_wait_seconds: match registry {
                Some(r) => register(r, ack_wait_seconds),
                None => ack_wait_seconds,
            },
            acks_refused: counter(
                "iotfwd_store_acks_refused_total",
                "Source messages answered with an error (HTTP 503, AMQP nack with requeue) because \
                 their outcome records could not be committed (store.durability = \"acked\").",
            ),
            written: counter(
                "iotfwd_store_records_written_total",
                "Outcome records committed to the record store.",
            ),
            failed: counter(
                "iotfwd_store_records_failed_total",
                "Outcome records the record store could not write after retries (logged at ERROR).",
            ),
            purged: counter(
                "iotfwd_store_records_purged_total",
                "Outcome records deleted by retention (store.retention_days).",
            ),
            queued: match registry {
                Some(r) => register(r, queued),
                None => queued,
            },
            dropped: counter(
                "iotfwd_store_records_dropped_total",
                "Outcome records dropped because the PostgreSQL store was unreachable and \
                 store.queue_capacity records were already held (logged at ERROR).",
            ),
            backend_up: {
                let up = IntGauge::new(
                    "iotfwd_store_backend_up",
                    "Whether the record store's database answered its writer's last call (1) or \
                     not (0).",
                )
                .expect("valid metric");
                up.set(1);
                match registry {
                    Some(r) => register(r, up),
                    None => up,
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_gauge_is_absent_until_exported() {
        let m = Metrics::new();
        // Set without a broker (nothing should, but it must not show).
        m.broker_connected.set(0);
        assert!(!m.render().contains("iotfwd_broker_connected"));
        m.export_broker_gauges();
        m.export_broker_gauges();
        assert!(m.render().contains("\niotfwd_broker_connected 0\n"));
        m.broker_connected.set(1);
        assert!(m.render().contains("\niotfwd_broker_connected 1\n"));
    }

    #[test]
    fn throttled_names_the_iot_instance_iot_instance() {
        let m = Metrics::new();
        m.throttled
            .with_label_values(&["acme", "iot-acme-1", "instance"])
            .inc();
        let series = m
            .render()
            .lines()
            .find(|l| l.starts_with("iotfwd_throttled_total{"))
            .expect("a series")
            .to_owned();
        assert_eq!(
            series,
            r#"iotfwd_throttled_total{iot_instance="iot-acme-1",scope="instance",tenant="acme"} 1"#
        );
    }
}
