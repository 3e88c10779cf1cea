//! Where a group's backlog lives: in the spool on disk (the embedded default, see
//! [`crate::spool::backlog`]), in a durable RabbitMQ queue (`iotfwd.group.<id>`) that any
//! iotfwd process of the cluster can serve, or only in memory (a hub built without either).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::watch;

use super::delivery::Delivery;
use super::group::{Group, Pending};
use super::stopped;
use crate::broker::{Broker, failure_headers};
use crate::outcome::{Code, Failure, Record, payload_excerpt};
use crate::spool::Spool;

/// Where a group's backlog lives.
pub(super) enum Backend {
    Memory,
    /// Each message is a row of `<data.dir>/spool.db` from before the forward is answered
    /// until it is settled for good; the group's ready queue in memory schedules them.
    Spool(Spool),
    Broker {
        broker: Arc<Broker>,
        queue: String,
        declared: AtomicBool,
        /// Last known depth of the queue.
        depth: AtomicU64,
    },
}

impl Backend {
    /// The backlog of group `id`: its RabbitMQ queue with a broker, else the spool when
    /// there is one, else memory.
    pub(super) fn for_group(
        id: &str,
        broker: Option<&Arc<Broker>>,
        spool: Option<&Spool>,
    ) -> Backend {
        match broker {
            None => spool.map_or(Backend::Memory, |s| Backend::Spool(s.clone())),
            Some(b) => Backend::Broker {
                broker: Arc::clone(b),
                queue: format!("iotfwd.group.{id}"),
                declared: AtomicBool::new(false),
                depth: AtomicU64::new(0),
            },
        }
    }

    pub(super) fn is_broker(&self) -> bool {
        matches!(self, Backend::Broker { .. })
    }

    /// The spool holding the backlog, when it is there.
    pub(super) fn spool(&self) -> Option<&Spool> {
        match self {
            Backend::Spool(s) => Some(s),
            _ => None,
        }
    }

    /// `memory`, `spool` or `broker`, as `GET /api/v1/health` shows it.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Spool(_) => "spool",
            Backend::Broker { .. } => "broker",
        }
    }

    /// Messages in the broker queue, as last seen (0 otherwise: the group counts those).
    pub(super) fn depth(&self) -> u64 {
        match self {
            Backend::Memory | Backend::Spool(_) => 0,
            Backend::Broker { depth, .. } => depth.load(Ordering::Relaxed),
        }
    }

    /// Publishes one delivery to the group's queue (broker-backed only), declaring it first.
    pub(super) async fn publish(&self, group: &Group, d: &Delivery) -> Result<(), Failure> {
        let Backend::Broker {
            broker,
            queue,
            declared,
            ..
        } = self
        else {
            return Ok(());
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(d.message_id.as_str().into())
            .with_delivery_mode(2)
            .with_headers(d.to_headers());
        let max = group.config.max_backlog;
        // Twice at most: a publish returned as unroutable means the queue is gone (deleted by
        // an operator, say to change its retention); it is declared again, with its arguments,
        // and the publish is repeated once.
        for attempt in 0..2 {
            if !declared.load(Ordering::Relaxed) {
                group.declare(broker, queue).await?;
                declared.store(true, Ordering::Relaxed);
            }
            match broker.publish("", queue, &d.body, props.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.code() == Code::DestinationMisconfigured && attempt == 0 => {
                    tracing::warn!(group = %group.config.id, %queue, "the backlog queue is gone; declaring it again");
                    declared.store(false, Ordering::Relaxed);
                }
                Err(e) if e.code() == Code::DestinationError => {
                    return Err(e.map_reason(|r| {
                        format!("{r} (the backlog queue {queue:?} is full: max_backlog {max})")
                    }));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Publishes a rejected delivery to the group's dead-letter exchange (broker-backed
    /// only) and returns the record of that step; `None` without a broker.
    pub(super) async fn dead_letter(
        &self,
        group: &Group,
        d: &Delivery,
        exchange: &str,
        reason: &str,
    ) -> Option<Record> {
        let Backend::Broker { broker, .. } = self else {
            return None;
        };
        let headers = failure_headers(
            d.to_headers(),
            &format!("group:{}", group.config.id),
            Code::Rejected,
            reason,
            None,
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let result = broker.publish(exchange, &d.rule, &d.body, props).await;
        let why = result
            .as_ref()
            .err()
            .map(|e| format!(": {}", e.reason()))
            .unwrap_or_default();
        let mut record = Record::action(
            d,
            &d.rule,
            &format!("amqp:{exchange}"),
            &result,
            payload_excerpt(&d.body),
        )
        .with_reason(format!(
            "dead-letter to exchange {exchange:?} after {}{why}",
            Code::Rejected
        ));
        if record.tenant_id.is_empty()
            && let Some(tenant) = &group.config.tenant
        {
            record.tenant_id.clone_from(tenant);
        }
        Some(record)
    }
}

impl Group {
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
        if let Some(kind) = self.config.queue_type.argument() {
            args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        }
        args
    }

    async fn declare(&self, broker: &Broker, queue: &str) -> Result<u32, Failure> {
        let conn = broker.connection()?;
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
                crate::broker::classify(&e).map_reason(|r| format!(
                    "cannot declare the backlog queue {queue:?} of group {:?}: {r} (if its retention_s or max_backlog changed, delete the queue or set a policy)",
                    self.config.id
                ))
            })?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(q.message_count())
    }

    /// Broker-backed: consume the group's queue into `ready` while consumers are online here.
    pub(super) async fn feed_from_broker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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
                let n = self
                    .declare(broker, queue)
                    .await
                    .map_err(|e| e.reason().to_owned())?;
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
                            self.update_gauges(&self.lock());
                        }
                    }
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let d = Delivery::from_rabbit(&delivery.data, delivery.properties.headers().as_ref());
                            self.lock().ready.push_back(Pending::new(Arc::new(d), Some(delivery.acker)));
                            self.pump();
                        }
                        Some(Err(_)) | None => {
                            tracing::warn!(group = %self.config.id, "the backlog consumer stopped; reconnecting");
                            // Their acks died with the channel; RabbitMQ redelivers them.
                            self.lock().drop_broker_held();
                            continue 'reconnect;
                        }
                    },
                }
            }
        }
    }
}
