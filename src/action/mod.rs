//! Actions: what happens to a rule's output.
//!
//! Each action of a matched rule reaches exactly one terminal outcome, recorded once as a
//! `ruleengine` record carrying its code and attempt count: 200 when delivered, otherwise the
//! failure's code. A failure that may pass (broker down: 9325; nack or channel error: 9331) is
//! retried with exponential backoff and jitter under the action's `retry` policy; one that
//! cannot (9321 invalid parameter, 9332 exchange missing, 9333 access refused, 9399) is final at
//! once. A failed action hands the original payload to the rule's `[error_action]`; if that
//! fails too, the source message is not acked ([`DispatchReport::requeue`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use backon::Retryable;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::broker::{Broker, BrokerError, header};
use crate::engine::Output;
use crate::limits::Limiter;
use crate::message::Message;
use crate::outcome::{BizCode, Code, Outcomes, Record};
use crate::rules::{ActionSpec, AmqpAction, Rule};
use crate::subscription::{Delivery, Hub, RejectedDelivery};

/// The terminal outcome of one action for one message, as the HTTP API reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActionReport {
    pub destination: String,
    pub code: Code,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub attempts: u32,
    /// For a failed action with an `[error_action]`: that action's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_action: Option<Box<ActionReport>>,
}

/// Every action outcome of one rule for one message.
#[derive(Clone, Debug, Default)]
pub struct DispatchReport {
    pub actions: Vec<ActionReport>,
    /// An action and its error action both failed: the source should redeliver the message.
    pub requeue: bool,
}

/// What an action sends: the rule's output, or (for the error action) the original payload
/// with the failure described in headers.
enum Body<'a> {
    Output,
    Failure(&'a ActionReport),
}

/// Executes actions and records their outcomes.
#[derive(Clone)]
pub struct Dispatcher {
    outcomes: Outcomes,
    broker: Option<Arc<Broker>>,
    limiter: Limiter,
    /// Each destination's state for `GET /api/v1/health`, fed with every terminal outcome.
    health: Arc<crate::health::Health>,
    /// The consumer groups `to = "group"` actions forward to; `None` with the endpoint off.
    groups: Option<Arc<Hub>>,
}

impl Dispatcher {
    pub fn new(outcomes: Outcomes, broker: Option<Arc<Broker>>, limiter: Limiter) -> Dispatcher {
        Dispatcher {
            outcomes,
            broker,
            limiter,
            health: Arc::default(),
            groups: None,
        }
    }

    /// Reports each destination's outcomes to `health`.
    pub fn with_health(mut self, health: Arc<crate::health::Health>) -> Dispatcher {
        self.health = health;
        self
    }

    /// Forwards `to = "group"` actions to these consumer groups.
    pub fn with_groups(mut self, groups: Arc<Hub>) -> Dispatcher {
        self.groups = Some(groups);
        self
    }

    /// A group delivery its consumer rejected (9652) goes to the rule's `[error_action]`,
    /// with the delivered body as payload and the rejection in the `failed*` headers.
    /// Returns whether the error action delivered it.
    pub async fn reject_to_error_action(&self, rule: &Rule, rejected: &RejectedDelivery) -> bool {
        let Some(error_action) = &rule.error_action else {
            return false;
        };
        let message = rejected.delivery.to_message();
        let output: Output = serde_json::from_slice(&rejected.delivery.body).unwrap_or_default();
        let failed = ActionReport {
            destination: format!("group:{}", rejected.group),
            code: Code::Rejected,
            reason: rejected.reason.clone(),
            attempts: 1,
            error_action: None,
        };
        self.execute(
            &message,
            rule,
            error_action,
            &output,
            Body::Failure(&failed),
        )
        .await
        .code
        .is_success()
    }

    /// Runs every action of `rule` for one output, concurrently; one record per action (and
    /// per error action).
    pub async fn dispatch(
        &self,
        message: &Message,
        rule: &Rule,
        output: &Output,
    ) -> DispatchReport {
        if rule.actions.is_empty() {
            let content = serde_json::to_string(output).unwrap_or_default();
            self.outcomes
                .record(Record::for_message(
                    message,
                    BizCode::RuleEngine,
                    rule.name.clone(),
                    Code::Ok,
                    "",
                    content,
                ))
                .await;
            return DispatchReport::default();
        }
        let runs = rule.actions.iter().map(|action| async move {
            let mut report = self
                .execute(message, rule, action, output, Body::Output)
                .await;
            let mut requeue = false;
            if !report.code.is_success()
                && let Some(error_action) = &rule.error_action
            {
                let fallback = self
                    .execute(message, rule, error_action, output, Body::Failure(&report))
                    .await;
                requeue = !fallback.code.is_success();
                report.error_action = Some(Box::new(fallback));
            }
            (report, requeue)
        });
        let results = futures::future::join_all(runs).await;
        let requeue = results.iter().any(|(_, r)| *r);
        DispatchReport {
            actions: results.into_iter().map(|(a, _)| a).collect(),
            requeue,
        }
    }

    async fn execute(
        &self,
        message: &Message,
        rule: &Rule,
        action: &ActionSpec,
        output: &Output,
        body: Body<'_>,
    ) -> ActionReport {
        let destination = action.destination();
        let metrics = self.outcomes.metrics();
        let labels = [rule.name.as_str(), destination.as_str()];
        metrics.action_executions.with_label_values(&labels).inc();
        metrics.action_in_flight.with_label_values(&labels).inc();
        let attempts = AtomicU32::new(0);
        // Each forward counts once against its device, tenant and instance, before it runs.
        // The error action is where a refused or failed forward goes, so it is not counted.
        let quota = match body {
            Body::Output => {
                self.limiter
                    .acquire(
                        &message.product_key,
                        &message.device_name,
                        message.tenant_id.as_deref(),
                        message.instance_id.as_deref(),
                    )
                    .await
            }
            Body::Failure(_) => Ok(Default::default()),
        };
        let (tenant, instance) = match &quota {
            Ok(r) => (r.tenant.clone(), r.instance.clone()),
            Err(t) => (t.tenant.clone(), t.instance.clone()),
        };
        let result = match (quota, action) {
            (Err(throttle), _) => Err(BrokerError {
                code: throttle.code,
                reason: throttle.reason,
                retryable: false,
            }),
            (Ok(_), ActionSpec::Amqp(a)) => {
                self.publish(message, rule, a, output, &body, &attempts, &labels)
                    .await
            }
            (Ok(_), ActionSpec::Group(g)) => match &self.groups {
                Some(hub) => {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    hub.enqueue(&g.group, Delivery::new(message, &rule.name, output))
                        .await
                }
                None => Err(BrokerError {
                    code: Code::DestinationUnavailable,
                    reason: format!(
                        "consumer group {:?} is not hosted: the AMQP 1.0 endpoint is off (subscription.enabled = false)",
                        g.group
                    ),
                    retryable: false,
                }),
            },
        };
        let attempts = attempts.load(Ordering::Relaxed);
        self.health.observe(&destination, &result);
        metrics.action_in_flight.with_label_values(&labels).dec();
        let (code, mut reason) = match result {
            Ok(()) => {
                metrics.action_success.with_label_values(&labels).inc();
                if matches!(body, Body::Output) {
                    metrics
                        .forward_latency
                        .observe(message.received_at.elapsed().as_secs_f64());
                }
                (Code::Ok, String::new())
            }
            Err(e) => {
                metrics
                    .action_failed
                    .with_label_values(&[labels[0], labels[1], &e.code.to_string()])
                    .inc();
                (e.code, e.reason)
            }
        };
        if let Body::Failure(failed) = body {
            reason = format!(
                "error action for {} (which failed with {}){}{reason}",
                failed.destination,
                failed.code,
                if reason.is_empty() { "" } else { ": " }
            );
        }
        let content = serde_json::json!({ "attempts": attempts, "output": output }).to_string();
        let mut record = Record::for_message(
            message,
            BizCode::RuleEngine,
            format!("{}/{}", rule.name, destination),
            code,
            reason.clone(),
            content,
        );
        if let Some(t) = tenant {
            record.tenant_id = t.to_string();
        }
        if let Some(i) = instance {
            record.instance_id = i.to_string();
        }
        self.outcomes.record(record).await;
        ActionReport {
            destination,
            code,
            reason,
            attempts,
            error_action: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        message: &Message,
        rule: &Rule,
        action: &AmqpAction,
        output: &Output,
        body: &Body<'_>,
        attempts: &AtomicU32,
        labels: &[&str; 2],
    ) -> Result<(), BrokerError> {
        let invalid = |reason: String| BrokerError {
            code: Code::ParamInvalid,
            reason,
            retryable: false,
        };
        let routing_key = action
            .routing_key
            .render(output)
            .map_err(|e| invalid(format!("routing_key: {e}")))?;
        if routing_key.len() > 255 {
            return Err(invalid(format!(
                "routing_key is {} bytes; AMQP allows 255",
                routing_key.len()
            )));
        }
        let mut headers = FieldTable::default();
        for (name, template) in &action.headers {
            let value = template
                .render(output)
                .map_err(|e| invalid(format!("headers.{name}: {e}")))?;
            headers.insert(name.as_str().into(), header(&value));
        }
        for (name, value) in [
            ("traceId", message.trace_id.as_str()),
            ("messageId", &message.message_id),
            ("rule", &rule.name),
            ("topic", &message.topic),
            ("productKey", &message.product_key),
            ("deviceName", &message.device_name),
        ] {
            headers.insert(name.into(), header(value));
        }
        let payload: Vec<u8> = match body {
            Body::Output => serde_json::to_vec(output).expect("a JSON map serializes"),
            Body::Failure(failed) => {
                headers.insert("failedAction".into(), header(&failed.destination));
                headers.insert("failedCode".into(), header(&failed.code.to_string()));
                headers.insert("failedReason".into(), header(&failed.reason));
                headers.insert(
                    "failedAttempts".into(),
                    header(&failed.attempts.to_string()),
                );
                message.payload.to_vec()
            }
        };
        let Some(broker) = &self.broker else {
            return Err(BrokerError {
                code: Code::DestinationUnavailable,
                reason: "no [broker] is configured, so amqp actions cannot be delivered".into(),
                retryable: false,
            });
        };
        let mut properties = BasicProperties::default()
            .with_message_id(message.message_id.as_str().into())
            .with_timestamp((message.timestamp_ms.max(0) / 1000) as u64)
            .with_headers(headers);
        if matches!(body, Body::Output) {
            properties = properties.with_content_type("application/json".into());
        }
        if action.persistent {
            properties = properties.with_delivery_mode(2);
        }
        let retries = self
            .outcomes
            .metrics()
            .action_retries
            .with_label_values(labels);
        let publish = || {
            attempts.fetch_add(1, Ordering::Relaxed);
            broker.publish(&action.exchange, &routing_key, &payload, properties.clone())
        };
        publish
            .retry(action.retry.backoff())
            .when(|e: &BrokerError| e.retryable)
            .notify(|e: &BrokerError, after| {
                retries.inc();
                tracing::debug!(exchange = %action.exchange, "publish failed, retrying in {after:?}: {e}");
            })
            .await
            .map_err(|mut e| {
                let n = attempts.load(Ordering::Relaxed);
                if n > 1 {
                    e.reason = format!("{} (after {n} attempts)", e.reason);
                }
                e
            })
    }
}
