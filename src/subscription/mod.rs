//! Consumer groups: the platform's server-side subscription, hosted by iotfwd.
//!
//! A `to = "group"` action hands the rule output to its group ([`Hub::enqueue`]). The group
//! keeps a backlog (bounded memory, or a durable RabbitMQ queue when `[broker]` is set) and
//! pushes each message to exactly one of its consumer connections, round robin over those
//! with room in their window. A delivery stays unsettled until the consumer settles it:
//!
//! | consumer outcome | code | then |
//! |---|---|---|
//! | Accepted | 200 | done |
//! | Released, Modified | 9651 | redelivered |
//! | Rejected | 9652 | the rule's error action, else the group's dead-letter exchange |
//! | none within `ack_timeout_ms` | 9650 | redelivered, to another consumer when there is one |
//! | consumer disconnects | — | redelivered |
//!
//! Every outcome is a `ServerSubscribe` record. A forward while no consumer is online is 9203
//! and waits in the backlog. The AMQP 1.0 side lives in [`endpoint`].

pub mod auth;
pub mod client;
pub mod endpoint;

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, watch};

use crate::broker::{Broker, BrokerError, header, header_text};
use crate::config::subscription::GroupConfig;
use crate::engine::Output;
use crate::message::Message;
use crate::outcome::{BizCode, Code, Outcomes, Record};

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
        [
            ("topic", &self.topic),
            ("productKey", &self.product_key),
            ("deviceName", &self.device_name),
            ("messageId", &self.message_id),
            ("traceId", &self.trace_id),
            ("rule", &self.rule),
        ]
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
    fn to_headers(&self) -> FieldTable {
        let mut h = FieldTable::default();
        for (name, value) in self.text_properties() {
            h.insert(name.into(), header(value));
        }
        h.insert(
            "generateTime".into(),
            AMQPValue::LongLongInt(self.generate_time),
        );
        h.insert("tenantId".into(), header(&self.tenant_id));
        h.insert("instanceId".into(), header(&self.instance_id));
        h
    }

    fn from_rabbit(body: &[u8], headers: Option<&FieldTable>) -> Delivery {
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

/// A delivery waiting for, or out with, a consumer.
pub struct Pending {
    pub delivery: Arc<Delivery>,
    /// Times it was handed to a consumer.
    pub attempts: u32,
    /// The consumer that last had it, so a redelivery prefers another.
    last_consumer: Option<u64>,
    /// Its RabbitMQ delivery, acked when it is settled for good (broker-backed backlog).
    ack: Option<lapin::Acker>,
    since: Instant,
}

/// A rejected delivery on its way to the rule's error action.
pub struct RejectedDelivery {
    pub group: String,
    pub delivery: Arc<Delivery>,
    pub reason: String,
    /// Resolves with whether the error action took it (200).
    pub done: tokio::sync::oneshot::Sender<bool>,
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
}

impl GroupMetrics {
    pub fn new(registry: &Registry) -> GroupMetrics {
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["group"]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        GroupMetrics {
            connections: gauge(
                "iotfwd_group_connections",
                "Consumer connections of the group open on this process.",
            ),
            backlog: gauge(
                "iotfwd_group_backlog_messages",
                "Messages waiting for a consumer of the group (the broker queue's depth plus what this process holds).",
            ),
            unsettled: gauge(
                "iotfwd_group_unsettled_messages",
                "Deliveries out with consumers and not yet settled.",
            ),
            delivered: counter(
                "iotfwd_group_delivered_total",
                "Deliveries sent to consumers (redeliveries included).",
                &["group"],
            ),
            outcomes: counter(
                "iotfwd_group_outcomes_total",
                "Settled deliveries by outcome: accepted, released, rejected, timeout.",
                &["group", "outcome"],
            ),
            auth_failures: counter(
                "iotfwd_group_auth_failures_total",
                "Refused logins, by the group the client named (\"_unknown\" when it named none that exists).",
                &["group"],
            ),
            refused: counter(
                "iotfwd_group_refused_total",
                "Connections refused after login, by code (9600 connection limit, 9601 idle time-out).",
                &["group", "code"],
            ),
        }
    }
}

/// Where a group's backlog lives.
enum Backend {
    Memory,
    Broker {
        broker: Arc<Broker>,
        queue: String,
        declared: AtomicBool,
        /// Last known depth of the queue.
        depth: AtomicU64,
    },
}

struct Slot {
    id: u64,
    client_id: String,
    tx: mpsc::UnboundedSender<Pending>,
    outstanding: usize,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Pending>,
    consumers: Vec<Slot>,
    next: usize,
    /// Stops the broker consumer feeding `ready` (broker-backed groups, while consumers are
    /// online).
    feed: Option<watch::Sender<bool>>,
}

/// One consumer group.
pub struct Group {
    pub config: GroupConfig,
    state: Mutex<State>,
    backend: Backend,
    outcomes: Outcomes,
    metrics: GroupMetrics,
    rejects: mpsc::UnboundedSender<RejectedDelivery>,
    rate: Option<governor::DefaultDirectRateLimiter>,
    has_error_action: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// How a delivery was settled, as the endpoint saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    Accepted,
    /// Released or Modified.
    Released,
    Rejected(String),
    Timeout,
    /// The link or connection went away before an outcome: redelivered, no record.
    Lost,
}

static NEXT_CONSUMER: AtomicU64 = AtomicU64::new(1);

/// A consumer connection's place in its group.
pub struct Membership {
    pub id: u64,
    pub group: Arc<Group>,
    pub rx: mpsc::UnboundedReceiver<Pending>,
}

impl Group {
    fn labels(&self) -> [&str; 1] {
        [self.config.id.as_str()]
    }

    /// Takes a consumer connection in, or refuses it (9600) when the group is full.
    pub fn join(self: &Arc<Self>, client_id: &str) -> Result<Membership, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT_CONSUMER.fetch_add(1, Ordering::Relaxed);
        let start_feed = {
            let mut st = self.state.lock().expect("group lock");
            if st.consumers.len() >= self.config.max_connections {
                return Err(format!(
                    "consumer group {:?} already has {} connections (max_connections {})",
                    self.config.id,
                    st.consumers.len(),
                    self.config.max_connections
                ));
            }
            st.consumers.push(Slot {
                id,
                client_id: client_id.to_owned(),
                tx,
                outstanding: 0,
            });
            self.metrics
                .connections
                .with_label_values(&self.labels())
                .set(st.consumers.len() as i64);
            matches!(self.backend, Backend::Broker { .. }) && st.feed.is_none()
        };
        if start_feed {
            let (stop_tx, stop_rx) = watch::channel(false);
            self.state.lock().expect("group lock").feed = Some(stop_tx);
            tokio::spawn(Arc::clone(self).feed_from_broker(stop_rx));
        }
        self.pump();
        Ok(Membership {
            id,
            group: Arc::clone(self),
            rx,
        })
    }

    /// A consumer connection is gone: whatever it held unsent goes back to the front.
    pub fn leave(&self, membership: &mut Membership) {
        let mut returned = Vec::new();
        while let Ok(p) = membership.rx.try_recv() {
            returned.push(p);
        }
        let mut st = self.state.lock().expect("group lock");
        st.consumers.retain(|s| s.id != membership.id);
        self.metrics
            .connections
            .with_label_values(&self.labels())
            .set(st.consumers.len() as i64);
        for p in returned.into_iter().rev() {
            st.ready.push_front(p);
        }
        if st.consumers.is_empty() {
            // Nobody here to deliver to: hand broker-held messages back to the queue (the
            // channel closes, so RabbitMQ requeues them) for another process or later.
            if let Some(stop) = st.feed.take() {
                let _ = stop.send(true);
                st.ready.retain(|p| p.ack.is_none());
            }
        }
        self.update_gauges(&st);
        drop(st);
        self.pump();
    }

    fn update_gauges(&self, st: &State) {
        let unsettled: usize = st.consumers.iter().map(|s| s.outstanding).sum();
        self.metrics
            .unsettled
            .with_label_values(&self.labels())
            .set(unsettled as i64);
        let depth = match &self.backend {
            Backend::Memory => 0,
            Backend::Broker { depth, .. } => depth.load(Ordering::Relaxed),
        };
        self.metrics
            .backlog
            .with_label_values(&self.labels())
            .set((st.ready.len() as u64 + depth) as i64);
    }

    /// Hands ready deliveries to consumers with room, round robin; a redelivery goes to
    /// another consumer than the last one when one has room.
    fn pump(&self) {
        let mut st = self.state.lock().expect("group lock");
        self.expire(&mut st);
        let window = self.config.window;
        while !st.ready.is_empty() && !st.consumers.is_empty() {
            let n = st.consumers.len();
            let last = st.ready.front().and_then(|p| p.last_consumer);
            let start = st.next % n;
            let order = (0..n).map(|k| (start + k) % n);
            let mut pick = None;
            for i in order {
                let s = &st.consumers[i];
                if s.outstanding < window {
                    if Some(s.id) != last || n == 1 {
                        pick = Some(i);
                        break;
                    }
                    pick.get_or_insert(i);
                }
            }
            let Some(i) = pick else { break };
            let mut p = st.ready.pop_front().expect("not empty");
            p.attempts += 1;
            p.last_consumer = Some(st.consumers[i].id);
            match st.consumers[i].tx.send(p) {
                Ok(()) => {
                    st.consumers[i].outstanding += 1;
                    st.next = i + 1;
                }
                Err(mpsc::error::SendError(mut p)) => {
                    // The connection is on its way out; leave() removes it.
                    p.attempts -= 1;
                    st.ready.push_front(p);
                    let id = st.consumers[i].id;
                    st.consumers.retain(|s| s.id != id);
                }
            }
        }
        self.update_gauges(&st);
    }

    /// Drops in-memory deliveries older than the retention (9203: nobody took them).
    fn expire(&self, st: &mut State) {
        let retention = Duration::from_secs(self.config.retention_s);
        while let Some(p) = st.ready.front() {
            if p.ack.is_some() || p.since.elapsed() < retention {
                break;
            }
            let p = st.ready.pop_front().expect("front exists");
            let record = self.record(
                &p.delivery,
                Code::ConsumerOffline,
                format!(
                    "expired after the group's retention ({} s) with no consumer taking it",
                    self.config.retention_s
                ),
                "",
            );
            let outcomes = self.outcomes.clone();
            tokio::spawn(async move { outcomes.record(record).await });
        }
    }

    fn record(&self, d: &Delivery, code: Code, reason: String, client: &str) -> Record {
        let content = if client.is_empty() {
            String::from_utf8_lossy(&d.body[..d.body.len().min(256)]).into_owned()
        } else {
            serde_json::json!({ "client": client, "rule": d.rule }).to_string()
        };
        Record {
            time_ms: crate::message::now_ms(),
            trace_id: d.trace_id.clone(),
            message_id: d.message_id.clone(),
            product_key: d.product_key.clone(),
            device_name: d.device_name.clone(),
            biz_code: BizCode::ServerSubscribe,
            operation: self.config.id.clone(),
            code,
            reason,
            content,
            tenant_id: if d.tenant_id.is_empty() {
                self.config.tenant.clone().unwrap_or_default()
            } else {
                d.tenant_id.clone()
            },
            instance_id: d.instance_id.clone(),
        }
    }

    /// Waits for the group's push rate, if it has one.
    pub async fn pace(&self) {
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
    }

    /// Counts one delivery sent.
    pub fn delivered(&self) {
        self.metrics
            .delivered
            .with_label_values(&self.labels())
            .inc();
    }

    /// A consumer's outcome for one of its deliveries.
    pub async fn settle(&self, consumer: u64, client_id: &str, mut p: Pending, how: Settlement) {
        {
            let mut st = self.state.lock().expect("group lock");
            if let Some(s) = st.consumers.iter_mut().find(|s| s.id == consumer) {
                s.outstanding = s.outstanding.saturating_sub(1);
            }
        }
        let outcome = |name: &str| {
            self.metrics
                .outcomes
                .with_label_values(&[self.config.id.as_str(), name])
                .inc();
        };
        let (record, redeliver) = match &how {
            Settlement::Accepted => {
                outcome("accepted");
                (Some((Code::Ok, String::new())), false)
            }
            Settlement::Released => {
                outcome("released");
                (
                    Some((
                        Code::Released,
                        format!(
                            "the consumer released it (attempt {}); redelivering",
                            p.attempts
                        ),
                    )),
                    true,
                )
            }
            Settlement::Timeout => {
                outcome("timeout");
                (
                    Some((
                        Code::AckTimeout,
                        format!(
                            "no outcome within the ack time-out ({} ms, attempt {}); redelivering",
                            self.config.ack_timeout_ms, p.attempts
                        ),
                    )),
                    true,
                )
            }
            Settlement::Rejected(error) => {
                outcome("rejected");
                let mut reason = "the consumer rejected it".to_owned();
                if !error.is_empty() {
                    reason.push_str(&format!(" ({error})"));
                }
                (Some((Code::Rejected, reason)), false)
            }
            Settlement::Lost => (None, true),
        };
        if let Some((code, reason)) = record {
            let r = self.record(&p.delivery, code, reason.clone(), client_id);
            self.outcomes.record(r).await;
            if let Settlement::Rejected(_) = how {
                self.dead_letter(&p.delivery, reason).await;
            }
        }
        if redeliver {
            let mut st = self.state.lock().expect("group lock");
            // A broker-held copy whose consumer channel is gone comes back from RabbitMQ
            // itself; keeping it too would deliver it twice.
            if p.ack.is_none() || st.feed.is_some() {
                st.ready.push_front(p);
            }
        } else if let Some(ack) = p.ack.take()
            && let Err(e) = ack.ack(BasicAckOptions::default()).await
        {
            tracing::warn!(group = %self.config.id, "could not ack the backlog copy ({e}); it will be delivered again");
        }
        self.pump();
    }

    /// A rejected delivery goes to its rule's error action, else to the group's dead-letter
    /// exchange; each attempt is recorded.
    async fn dead_letter(&self, d: &Arc<Delivery>, reason: String) {
        if (self.has_error_action)(&d.rule) {
            let (done, taken) = tokio::sync::oneshot::channel();
            let sent = self.rejects.send(RejectedDelivery {
                group: self.config.id.clone(),
                delivery: Arc::clone(d),
                reason,
                done,
            });
            if sent.is_ok() {
                let _ = taken.await;
            }
            return;
        }
        let (Some(exchange), Backend::Broker { broker, .. }) =
            (&self.config.dead_letter_exchange, &self.backend)
        else {
            return;
        };
        let mut headers = d.to_headers();
        headers.insert(
            "failedAction".into(),
            header(&format!("group:{}", self.config.id)),
        );
        headers.insert("failedCode".into(), header(&Code::Rejected.to_string()));
        headers.insert("failedReason".into(), header(&reason));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let result = broker.publish(exchange, &d.rule, &d.body, props).await;
        let (code, why) = match result {
            Ok(()) => (Code::Ok, String::new()),
            Err(e) => (e.code, e.reason),
        };
        let mut record = self.record(
            d,
            code,
            format!(
                "dead-letter to exchange {exchange:?} after 9652{}{why}",
                if why.is_empty() { "" } else { ": " }
            ),
            "",
        );
        record.biz_code = BizCode::RuleEngine;
        record.operation = format!("{}/amqp:{exchange}", d.rule);
        self.outcomes.record(record).await;
    }

    /// Takes one forward into the backlog. 9203 is recorded when no consumer is online.
    pub async fn enqueue(&self, d: Delivery) -> Result<(), BrokerError> {
        let online = !self.state.lock().expect("group lock").consumers.is_empty();
        match &self.backend {
            Backend::Memory => {
                let d = Arc::new(d);
                {
                    let mut st = self.state.lock().expect("group lock");
                    if st.ready.len() >= self.config.max_backlog {
                        return Err(BrokerError {
                            code: Code::DestinationUnavailable,
                            reason: format!(
                                "the backlog of consumer group {:?} is full ({} messages, max_backlog)",
                                self.config.id, self.config.max_backlog
                            ),
                            retryable: false,
                        });
                    }
                    st.ready.push_back(Pending {
                        delivery: Arc::clone(&d),
                        attempts: 0,
                        last_consumer: None,
                        ack: None,
                        since: Instant::now(),
                    });
                }
                if !online {
                    self.offline(&d).await;
                }
                self.pump();
                Ok(())
            }
            Backend::Broker {
                broker,
                queue,
                declared,
                ..
            } => {
                if !declared.load(Ordering::Relaxed) {
                    self.declare(broker, queue).await?;
                    declared.store(true, Ordering::Relaxed);
                }
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(d.message_id.as_str().into())
                    .with_delivery_mode(2)
                    .with_headers(d.to_headers());
                broker
                    .publish("", queue, &d.body, props)
                    .await
                    .map_err(|mut e| {
                        if e.code == Code::DestinationError {
                            e.reason = format!(
                                "{} (the backlog queue {queue:?} is full: max_backlog {})",
                                e.reason, self.config.max_backlog
                            );
                        }
                        e
                    })?;
                if !online {
                    self.offline(&d).await;
                }
                Ok(())
            }
        }
    }

    async fn offline(&self, d: &Delivery) {
        let r = self.record(
            d,
            Code::ConsumerOffline,
            format!(
                "no consumer of group {:?} is online; the message waits in the backlog",
                self.config.id
            ),
            "",
        );
        self.outcomes.record(r).await;
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((self.config.retention_s * 1000) as i64),
        );
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.config.max_backlog as i64),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    async fn declare(&self, broker: &Broker, queue: &str) -> Result<u32, BrokerError> {
        let conn = broker.connection().await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| crate::broker::classify(&e))?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_args(),
            )
            .await
            .map_err(|e| {
                let mut err = crate::broker::classify(&e);
                err.reason = format!(
                    "cannot declare the backlog queue {queue:?} of group {:?}: {} (if its retention_s or max_backlog changed, delete the queue or set a policy)",
                    self.config.id, err.reason
                );
                err
            })?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(q.message_count())
    }

    /// Broker-backed: consume the group's queue into `ready` while consumers are online here.
    async fn feed_from_broker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Backend::Broker {
            broker,
            queue,
            declared,
            depth,
        } = &self.backend
        else {
            return;
        };
        let prefetch = (self.config.window * 2).min(u16::MAX as usize) as u16;
        'reconnect: loop {
            let Some(conn) = broker.connect_with_backoff(&stop).await else {
                return;
            };
            let consumed = async {
                let n = self.declare(broker, queue).await.map_err(|e| e.reason)?;
                declared.store(true, Ordering::Relaxed);
                depth.store(n as u64, Ordering::Relaxed);
                let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let tag = format!("iotfwd-group-{}-{}", self.config.id, std::process::id());
                let consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((channel, consumer, tag))
            }
            .await;
            let (channel, mut consumer, tag) = match consumed {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(group = %self.config.id, "cannot consume the backlog queue: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'reconnect,
                        _ = stopped(&mut stop) => return,
                    }
                }
            };
            let mut poll = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => {
                        let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                        let _ = channel.close(200, "no consumers online".into()).await;
                        return;
                    }
                    _ = poll.tick() => {
                        if let Ok(q) = channel.queue_declare(queue.as_str().into(), QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() }, FieldTable::default()).await {
                            depth.store(q.message_count() as u64, Ordering::Relaxed);
                            self.update_gauges(&self.state.lock().expect("group lock"));
                        }
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let d = Delivery::from_rabbit(&delivery.data, delivery.properties.headers().as_ref());
                            self.state.lock().expect("group lock").ready.push_back(Pending {
                                delivery: Arc::new(d),
                                attempts: 0,
                                last_consumer: None,
                                ack: Some(delivery.acker),
                                since: Instant::now(),
                            });
                            self.pump();
                        }
                        Some(Err(_)) | None => {
                            tracing::warn!(group = %self.config.id, "the backlog consumer stopped; reconnecting");
                            // Their acks died with the channel; RabbitMQ redelivers them.
                            self.state.lock().expect("group lock").ready.retain(|p| p.ack.is_none());
                            continue 'reconnect;
                        }
                    },
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Every consumer group of this daemon.
pub struct Hub {
    groups: HashMap<String, Arc<Group>>,
    pub metrics: GroupMetrics,
    pub verifier: Arc<auth::Verifier>,
}

impl Hub {
    /// Builds the groups; their secrets are resolved now, so a missing one stops the start.
    /// Rejected deliveries whose rule has an error action (`has_error_action(rule)`) are sent
    /// to `rejects`.
    pub fn new(
        configs: &[GroupConfig],
        broker: Option<Arc<Broker>>,
        outcomes: Outcomes,
        metrics: GroupMetrics,
        rejects: mpsc::UnboundedSender<RejectedDelivery>,
        has_error_action: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Result<Hub, String> {
        let mut groups = HashMap::new();
        let mut creds = HashMap::new();
        for c in configs {
            let secret = c.secret()?;
            creds.insert(
                c.id.clone(),
                auth::GroupCredentials {
                    access_key_id: c.access_key_id.clone(),
                    secret,
                    instance_id: c.instance.clone(),
                },
            );
            let backend = match &broker {
                None => Backend::Memory,
                Some(b) => Backend::Broker {
                    broker: Arc::clone(b),
                    queue: format!("iotfwd.group.{}", c.id),
                    declared: AtomicBool::new(false),
                    depth: AtomicU64::new(0),
                },
            };
            let rate = NonZeroU32::new(c.push_rate)
                .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r)));
            metrics.connections.with_label_values(&[&c.id]).set(0);
            metrics.backlog.with_label_values(&[&c.id]).set(0);
            metrics.unsettled.with_label_values(&[&c.id]).set(0);
            groups.insert(
                c.id.clone(),
                Arc::new(Group {
                    config: c.clone(),
                    state: Mutex::new(State::default()),
                    backend,
                    outcomes: outcomes.clone(),
                    metrics: metrics.clone(),
                    rejects: rejects.clone(),
                    rate,
                    has_error_action: Arc::clone(&has_error_action),
                }),
            );
        }
        Ok(Hub {
            groups,
            metrics,
            verifier: Arc::new(auth::Verifier::new(creds)),
        })
    }

    pub fn group(&self, id: &str) -> Option<&Arc<Group>> {
        self.groups.get(id)
    }

    /// Reads every group's secret again from its `secret_env` or `secret_file` (never creating
    /// the file) and swaps in those that changed: the names of the rotated groups, or, per
    /// group whose secret cannot be read, why (that group keeps its running secret).
    pub fn reload_secrets(&self) -> (Vec<String>, Vec<String>) {
        let (mut rotated, mut errors) = (Vec::new(), Vec::new());
        let mut ids: Vec<&String> = self.groups.keys().collect();
        ids.sort();
        for id in ids {
            let mut config = self.groups[id].config.clone();
            config.create_secret = false;
            match config.secret() {
                Ok(secret) => {
                    if self.verifier.rotate_secret(id, secret) {
                        rotated.push(id.clone());
                    }
                }
                Err(e) => errors.push(format!("{e} (group {id:?} keeps its running secret)")),
            }
        }
        (rotated, errors)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.groups.values()
    }

    /// Hands one rule output to group `id` (the `to = "group"` action).
    pub async fn enqueue(&self, id: &str, d: Delivery) -> Result<(), BrokerError> {
        match self.groups.get(id) {
            Some(g) => g.enqueue(d).await,
            None => Err(BrokerError {
                code: Code::DestinationUnavailable,
                reason: format!(
                    "no consumer group {id:?} is configured (add a [[group]] with id = {id:?})"
                ),
                retryable: false,
            }),
        }
    }

    /// Per group, for `GET /api/v1/health`: `state` (`unhealthy` while messages wait and no
    /// consumer is connected here, else `healthy`), connections and their client ids, the
    /// backlog (`memory` or `broker`), messages waiting and deliveries unsettled.
    pub fn status(&self) -> Vec<serde_json::Value> {
        let mut out: Vec<_> = self
            .groups
            .values()
            .map(|g| {
                let st = g.state.lock().expect("group lock");
                let unsettled: usize = st.consumers.iter().map(|s| s.outstanding).sum();
                let depth = match &g.backend {
                    Backend::Memory => 0,
                    Backend::Broker { depth, .. } => depth.load(Ordering::Relaxed),
                };
                let waiting = st.ready.len() as u64 + depth;
                // Messages waiting with nobody to take them is the 9203 situation.
                let state = if st.consumers.is_empty() && waiting > 0 {
                    "unhealthy"
                } else {
                    "healthy"
                };
                serde_json::json!({
                    "group": g.config.id,
                    "state": state,
                    "backlog": if matches!(g.backend, Backend::Memory) { "memory" } else { "broker" },
                    "connections": st.consumers.len(),
                    "clients": st.consumers.iter().map(|s| s.client_id.clone()).collect::<Vec<_>>(),
                    "waiting": waiting,
                    "unsettled": unsettled,
                })
            })
            .collect();
        out.sort_by(|a, b| a["group"].as_str().cmp(&b["group"].as_str()));
        out
    }
}

/// Finds the current version of a rule by name (rules are hot-reloaded).
pub type RuleLookup = Arc<dyn Fn(&str) -> Option<Arc<crate::rules::Rule>> + Send + Sync>;

/// The running endpoint: the groups, and how to stop it.
pub struct Running {
    pub hub: Arc<Hub>,
    /// Where the endpoint listens; `None` when no group is configured.
    pub addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    rejects: Option<mpsc::UnboundedReceiver<RejectedDelivery>>,
}

/// Builds the groups and starts the AMQP 1.0 endpoint when `[subscription]` is enabled.
/// Fails (and the daemon does not start) on a missing secret, unreadable TLS files or a
/// listen address that cannot be bound.
pub async fn start(
    config: &crate::config::Config,
    broker: Option<Arc<Broker>>,
    outcomes: Outcomes,
    registry: &Registry,
    rules: RuleLookup,
) -> anyhow::Result<Option<Running>> {
    let sub = &config.subscription;
    if !sub.enabled {
        if !config.group.is_empty() {
            tracing::warn!(
                groups = config.group.len(),
                "subscription.enabled = false: consumer groups are configured but not served; to = \"group\" actions fail with 9325"
            );
        }
        return Ok(None);
    }
    let (rejects_tx, rejects_rx) = mpsc::unbounded_channel();
    let lookup = Arc::clone(&rules);
    let hub = Hub::new(
        &config.group,
        broker.clone(),
        outcomes.clone(),
        GroupMetrics::new(registry),
        rejects_tx,
        Arc::new(move |rule: &str| lookup(rule).is_some_and(|r| r.error_action.is_some())),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let hub = Arc::new(hub);
    if config.group.is_empty() {
        // Nobody could log in: do not take the port.
        tracing::info!("no [[group]] configured: the AMQP 1.0 endpoint is not started");
        return Ok(Some(Running {
            hub,
            addr: None,
            stop: watch::channel(false).0,
            task: None,
            rejects: Some(rejects_rx),
        }));
    }
    let tls = endpoint::tls_acceptor(sub).map_err(|e| anyhow::anyhow!(e))?;
    let addr: std::net::SocketAddr = sub
        .listen
        .parse()
        .map_err(|_| anyhow::anyhow!("subscription.listen {:?} is not ip:port", sub.listen))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} (subscription.listen): {e}; set another address or subscription.enabled = false")
    })?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(endpoint::serve(
        listener,
        Arc::clone(&hub),
        sub.clone(),
        tls.clone(),
        outcomes,
        stopped,
    ));
    let mut ids: Vec<&str> = config.group.iter().map(|g| g.id.as_str()).collect();
    ids.sort_unstable();
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        groups = %ids.join(", "),
        "AMQP 1.0 consumer-group endpoint listening"
    );
    if broker.is_none() {
        tracing::warn!(
            "consumer-group backlogs are held in memory (no [broker]): messages waiting for a consumer do not survive a restart"
        );
    }
    Ok(Some(Running {
        hub,
        addr: Some(addr),
        stop,
        task: Some(task),
        rejects: Some(rejects_rx),
    }))
}

impl Running {
    /// Sends rejected deliveries to their rule's error action through `dispatcher`.
    pub fn spawn_reject_handler(
        &mut self,
        dispatcher: crate::action::Dispatcher,
        rules: RuleLookup,
    ) {
        let Some(mut rx) = self.rejects.take() else {
            return;
        };
        tokio::spawn(async move {
            while let Some(rejected) = rx.recv().await {
                let taken = match rules(&rejected.delivery.rule) {
                    Some(rule) => dispatcher.reject_to_error_action(&rule, &rejected).await,
                    None => false,
                };
                let _ = rejected.done.send(taken);
            }
        });
    }

    /// Closes every consumer connection (9602 each) and stops listening.
    pub async fn shutdown(self, within: Duration) {
        let _ = self.stop.send(true);
        let Some(task) = self.task else { return };
        if tokio::time::timeout(within, task).await.is_err() {
            tracing::warn!("consumer connections did not close within {within:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(
        configure: impl FnOnce(&mut GroupConfig),
    ) -> (Hub, mpsc::UnboundedReceiver<RejectedDelivery>) {
        let dir = std::env::temp_dir();
        let mut g = GroupConfig::demo(&dir);
        g.id = "g".into();
        g.secret_env = Some("PATH".into()); // any variable that is set
        g.secret_file = None;
        g.create_secret = false;
        configure(&mut g);
        let metrics = Arc::new(crate::telemetry::Metrics::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub::new(
            &[g],
            None,
            Outcomes::new(Arc::clone(&metrics)),
            GroupMetrics::new(&metrics.registry),
            tx,
            Arc::new(|_: &str| false),
        )
        .unwrap();
        (hub, rx)
    }

    fn delivery(n: usize) -> Delivery {
        Delivery {
            body: Bytes::from(format!("{{\"n\":{n}}}")),
            topic: "/p/d/post".into(),
            product_key: "p".into(),
            device_name: "d".into(),
            message_id: n.to_string(),
            trace_id: format!("t{n}"),
            rule: "r".into(),
            generate_time: 0,
            tenant_id: String::new(),
            instance_id: String::new(),
        }
    }

    fn ids(m: &mut Membership) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(p) = m.rx.try_recv() {
            out.push(p.delivery.message_id.clone());
        }
        out
    }

    #[tokio::test]
    async fn deliveries_spread_round_robin_within_each_window() {
        let (hub, _rx) = hub(|g| g.window = 2);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        let mut b = g.join("b").unwrap();
        for n in 0..6 {
            hub.enqueue("g", delivery(n)).await.unwrap();
        }
        let (got_a, got_b) = (ids(&mut a), ids(&mut b));
        assert_eq!((got_a.len(), got_b.len()), (2, 2), "{got_a:?} {got_b:?}");
        let mut all = [got_a, got_b].concat();
        all.sort();
        assert_eq!(all, ["0", "1", "2", "3"]);
        assert_eq!(
            g.state.lock().unwrap().ready.len(),
            2,
            "the rest waits for room"
        );
    }

    #[tokio::test]
    async fn a_timed_out_delivery_goes_to_the_other_consumer_and_a_full_backlog_refuses() {
        let (hub, _rx) = hub(|g| g.max_backlog = 2);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        hub.enqueue("g", delivery(1)).await.unwrap();
        let p = a.rx.try_recv().unwrap();
        let mut b = g.join("b").unwrap();
        g.settle(a.id, "a", p, Settlement::Timeout).await;
        assert_eq!(ids(&mut b), ["1"], "redelivered to the other consumer");
        assert!(ids(&mut a).is_empty());

        g.leave(&mut a);
        g.leave(&mut b);
        hub.enqueue("g", delivery(2)).await.unwrap();
        hub.enqueue("g", delivery(3)).await.unwrap();
        let full = hub.enqueue("g", delivery(4)).await.unwrap_err();
        assert_eq!(full.code, Code::DestinationUnavailable);
        assert!(full.reason.contains("max_backlog"), "{}", full.reason);
        let unknown = hub.enqueue("nope", delivery(5)).await.unwrap_err();
        assert!(
            unknown.reason.contains("no consumer group \"nope\""),
            "{}",
            unknown.reason
        );
    }

    #[tokio::test]
    async fn a_full_group_refuses_a_connection_and_unsent_deliveries_return_on_leave() {
        let (hub, _rx) = hub(|g| g.max_connections = 1);
        let g = Arc::clone(hub.group("g").unwrap());
        let mut a = g.join("a").unwrap();
        let refused = g.join("b").err().unwrap();
        assert!(refused.contains("max_connections 1"), "{refused}");
        for n in 0..3 {
            hub.enqueue("g", delivery(n)).await.unwrap();
        }
        g.leave(&mut a);
        let st = g.state.lock().unwrap();
        let back: Vec<_> = st
            .ready
            .iter()
            .map(|p| p.delivery.message_id.clone())
            .collect();
        assert_eq!(back, ["0", "1", "2"], "in their order");
    }
}
