//! `to = "group"`: hand each output to a consumer group hosted by iotfwd's AMQP 1.0 endpoint
//! ([`crate::subscription`]), and run the rule's error action for deliveries its consumers
//! reject (9652).
//!
//! The action is terminal (200) once the group has the message in its backlog; what the
//! consumer does with it later is recorded by the group as `ServerSubscribe` records.

use std::sync::Arc;

use tokio::sync::mpsc;

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

/// Runs the error action of each delivery a consumer rejected (9652), with the delivered body
/// as payload and the rejection in the `failed*` headers, and answers each with whether the
/// error action delivered it. Ends when the groups are gone.
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
                    let taken = match rules(&rejected.delivery.rule) {
                        Some(rule) => {
                            let message = rejected.delivery.to_message();
                            let output: Output =
                                serde_json::from_slice(&rejected.delivery.body).unwrap_or_default();
                            let failed = ActionReport {
                                destination: format!("group:{}", rejected.group),
                                code: Code::Rejected,
                                reason: rejected.reason.clone(),
                                attempts: 1,
                                error_action: None,
                            };
                            dispatcher
                                .run_error_action(&message, &rule, &output, &failed)
                                .await
                                .unwrap_or(false)
                        }
                        None => false,
                    };
                    let _ = rejected.done.send(taken);
                }
            })
            .await;
    })
}

/// Rejected deliveries whose error actions run at once, across every group. Each consumer
/// connection also bounds its own (see the endpoint), so what waits here is bounded too.
const REJECTS_AT_ONCE: usize = 32;
