//! `to = "amqp"`: publish each output to a RabbitMQ exchange with publisher confirms (the
//! connection and channels are [`crate::broker`]'s).
//!
//! The body is the rule output as JSON (`content_type: application/json`); for an error
//! action it is the original payload, with the failure in `failed*` headers. Every publish
//! carries the message's identity in headers and its message id and time as properties.

use std::sync::Arc;

use backon::Retryable;
use lapin::BasicProperties;
use lapin::types::FieldTable;

use super::{Body, Destination, Job};
use crate::broker::{Broker, failure_headers, header, identity_headers};
use crate::outcome::Failure;
use crate::rules::AmqpAction;

/// Longest routing key AMQP 0-9-1 allows, in bytes.
const MAX_ROUTING_KEY: usize = 255;

/// The RabbitMQ destination; without a `[broker]` every publish fails with 9325.
#[derive(Clone, Default)]
pub struct Amqp {
    broker: Option<Arc<Broker>>,
}

impl Amqp {
    pub fn new(broker: Arc<Broker>) -> Amqp {
        Amqp {
            broker: Some(broker),
        }
    }
}

impl Destination for Amqp {
    type Spec = AmqpAction;

    async fn send(&self, action: &AmqpAction, job: &Job<'_>) -> Result<(), Failure> {
        let invalid = Failure::invalid_parameter;
        let routing_key = action
            .routing_key
            .render(job.output)
            .map_err(|e| invalid(format!("routing_key: {e}")))?;
        if routing_key.len() > MAX_ROUTING_KEY {
            return Err(invalid(format!(
                "routing_key is {} bytes; AMQP allows {MAX_ROUTING_KEY}",
                routing_key.len()
            )));
        }
        let mut headers = FieldTable::default();
        for (name, template) in &action.headers {
            let value = template
                .render(job.output)
                .map_err(|e| invalid(format!("headers.{name}: {e}")))?;
            headers.insert(name.as_str().into(), header(&value));
        }
        let message = job.message;
        let mut headers = identity_headers(headers, message.identity_properties(&job.rule.name));
        let payload: Vec<u8> = match job.body {
            Body::Output => serde_json::to_vec(job.output).expect("a JSON map serializes"),
            Body::Failure(failed) => {
                headers = failure_headers(
                    headers,
                    &failed.destination,
                    failed.code,
                    &failed.reason,
                    Some(failed.attempts),
                );
                message.payload.to_vec()
            }
        };
        let Some(broker) = &self.broker else {
            return Err(Failure::not_available(
                "no [broker] is configured, so amqp actions cannot be delivered",
            ));
        };
        let mut properties = BasicProperties::default()
            .with_message_id(message.message_id.as_str().into())
            .with_timestamp((message.timestamp_ms.max(0) / 1000) as u64)
            .with_headers(headers);
        if matches!(job.body, Body::Output) {
            properties = properties.with_content_type("application/json".into());
        }
        if action.persistent {
            properties = properties.with_delivery_mode(2);
        }
        let publish = || {
            job.attempt();
            broker.publish(&action.exchange, &routing_key, &payload, properties.clone())
        };
        publish
            .retry(action.retry.backoff())
            .when(|e: &Failure| e.retryable())
            .notify(|e: &Failure, after| {
                job.retries.inc();
                tracing::debug!(exchange = %action.exchange, "publish failed, retrying in {after:?}: {e}");
            })
            .await
            .map_err(|e| {
                let n = job.attempts.load(std::sync::atomic::Ordering::Relaxed);
                if n > 1 {
                    e.map_reason(|r| format!("{r} (after {n} attempts)"))
                } else {
                    e
                }
            })
    }
}
