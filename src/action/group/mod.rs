//! `to = "group"`: hand each output to a consumer group hosted by iotfwd's AMQP 1.0 endpoint
//! ([`crate::subscription`]); run the rule's error action for deliveries its consumers
//! reject (9652), and dead-letter what the error action does not take and what was released
//! or timed out `max_redeliveries` times.
//!
//! The action is terminal (200) once the group has the message in its backlog; what the
//! consumer does with it later is recorded by the group as `ServerSubscribe` records.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::dead_letter::Origin;
use super::{ActionReport, Destination, Dispatcher, Job};
use crate::engine::Output;
use crate::outcome::{Code, Failure};
use crate::rules::GroupAction;
use crate::subscription::{Delivery, Hub, RejectedDelivery, RuleLookup};

/// The consumer groups; without the endpoint every forward fails with 9325.
#[derive(Clone, Default)]
pub struct Groups {
    hub: Option<Arc<Hub>>,
}

impl Groups {
    pub fn new(hub: Arc<Hub>) -> Groups {
        Groups { hub: Some(hub) }
    }
}

impl Destination for Groups {
    type Spec = GroupAction;

    async fn send(&self, action: &GroupAction, job: &Job<'_>) -> Result<(), Failure> {
        let Some(hub) = &self.hub else {
            return Err(Failure::not_available(format!(
                "consumer group {:?} is not hosted: the AMQP 1.0 endpoint is off (subscription.enabled = false)",
                action.group
            )));
        };
        job.attempt();
        hub.enqueue(
            &action.group,
            Delivery::new(job.message, &job.rule.name, job.output),
        )
        .await
    }
}

/// Settles each delivery that ended without a consumer accepting it: one a consumer
/// rejected (9652) goes to the rule's error action, with the delivered body as payload and the
/// rejection in the `failed*` headers; one the error action did not take, and one released or
/// timed out `max_redeliveries` times (9651, 9650), goes to the dead-letter queue. Each is
/// answered with whether it was taken (else the group delivers it again). Ends when the groups
/// are gone.
pub fn spawn_reject_handler(
    mut rejects: mpsc::UnboundedReceiver<RejectedDelivery>,
    dispatcher: Dispatcher,
    rules: RuleLookup,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    tokio::spawn(async move {
        let stream = futures::stream::poll_fn(move |cx| rejects.poll_recv(cx));
        stream
            .for_each_concurrent(REJECTS_AT_ONCE, |rejected| {
                let (dispatcher, rules) = (dispatcher.clone(), Arc::clone(&rules));
                async move {
                    let taken = settle(&dispatcher, &rules, &rejected).await;
                    let _ = rejected.done.send(taken);
                }
            })
            .await;
    })
}

async fn settle(dispatcher: &Dispatcher, rules: &RuleLookup, rejected: &RejectedDelivery) -> bool {
    let message = rejected.delivery.to_message();
    let destination = format!("group:{}", rejected.group);
    let mut reason = rejected.reason.clone();
    if rejected.code == Code::Rejected
        && let Some(rule) = rules(&rejected.delivery.rule)
        && rule.error_action.is_some()
    {
        let output: Output = serde_json::from_slice(&rejected.delivery.body).unwrap_or_default();
        let failed = ActionReport {
            destination: destination.clone(),
            code: Code::Rejected,
            reason: rejected.reason.clone(),
            attempts: rejected.attempts,
            error_action: None,
            dead_lettered: None,
        };
        match dispatcher
            .run_error_action(&message, &rule, &output, &failed)
            .await
        {
            Some(true) => return true,
            Some(false) => reason.push_str("; the error action failed too"),
            None => {}
        }
    }
    dispatcher
        .dead_letter(
            &message,
            Origin::Group,
            &rejected.delivery.rule,
            &destination,
            rejected.code,
            &reason,
            rejected.attempts,
        )
        .await
        .unwrap_or(false)
}

/// Rejected deliveries whose error actions run at once, across every group. Each consumer
/// connection also bounds its own (see the endpoint), so what waits here is bounded too.
const REJECTS_AT_ONCE: usize = 32;
