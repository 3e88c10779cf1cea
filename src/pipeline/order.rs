//! Per-device order (`engine.ordering = "device"`, docs/ordering.md).
//!
//! Two links keep it, one at each end of the pipeline's queue:
//!
//! - [`Turns`]: a source that hands each message in from its own task (the RabbitMQ source
//!   spawns one per delivery) takes a [`Turn`] in delivery order; a submission enters the
//!   queue only after the one before it did, so the queue holds messages in the order the
//!   source received them.
//! - [`Lanes`]: one lane per device and destination. The batcher takes a [`Turn`] in its lane
//!   for each action of each message, in queue order (within a batch and across batches); an
//!   action starts once the same device's action to the same destination before it is
//!   terminal. Different devices, and one device's different destinations, run concurrently.
//!   A message waiting for a retry therefore holds its device's later messages to that
//!   destination until it is terminal (delivered, or failed to its error action or the
//!   dead-letter queue), and nothing else.

use std::collections::HashMap;

use tokio::sync::oneshot;

/// Hands out [`Turn`]s in the order they are asked for.
#[derive(Default)]
pub struct Turns {
    last: Option<oneshot::Receiver<()>>,
}

impl Turns {
    /// The next turn: it may enter the queue once every turn handed out before it did (or was
    /// dropped: a message rejected before it reached the queue does not hold the others).
    pub fn take(&mut self) -> Turn {
        let (done, rx) = oneshot::channel();
        Turn {
            after: self.last.replace(rx),
            done: Some(done),
        }
    }
}

/// A place in an order: one submission's in its source's order (see [`Turns`]), or one
/// action of a device's message in the lane of that device and destination (see [`Lanes`]). It goes after the turn
/// before it, and the turn after it may go once it is [`Turn::entered`] or dropped.
pub struct Turn {
    after: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// A turn that waits for nobody (a source without order to keep).
    pub fn free() -> Turn {
        Turn {
            after: None,
            done: None,
        }
    }

    /// Waits until the turn before this one is over (entered, or dropped).
    pub async fn wait(&mut self) {
        if let Some(after) = &mut self.after {
            // An error means the sender was dropped: that turn is over either way.
            let _ = after.await;
            self.after = None;
        }
    }

    /// This submission is in the queue: the next turn may go.
    pub(super) fn entered(&mut self) {
        self.done.take();
    }
}

/// A lane: product key, device name and destination (`amqp:<exchange>`, ...).
type Lane = (String, String, String);

/// For each device and destination with an action in flight, the signal that its latest
/// action is terminal; see the module docs.
#[derive(Default)]
pub(super) struct Lanes {
    tails: HashMap<Lane, oneshot::Receiver<()>>,
    /// Finished lanes are dropped when the map grows past this.
    prune_at: usize,
}

impl Lanes {
    /// The turn of the device's next action to `destination`, behind every one taken before;
    /// the action ends (and the next may go) when the turn is dropped.
    pub fn take(&mut self, product_key: &str, device_name: &str, destination: &str) -> Turn {
        let (done, rx) = oneshot::channel();
        let key = (
            product_key.to_owned(),
            device_name.to_owned(),
            destination.to_owned(),
        );
        let after = self.tails.insert(key, rx);
        Turn {
            after,
            done: Some(done),
        }
    }

    /// Drops the lanes with nothing in flight, once the map has grown.
    pub fn prune(&mut self) {
        if self.tails.len() <= self.prune_at.max(1024) {
            return;
        }
        self.tails
            .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        self.prune_at = self.tails.len() * 2;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tails.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_device_waits_for_its_earlier_action_to_the_same_destination_only() {
        let mut lanes = Lanes::default();
        let first = lanes.take("pk", "a", "amqp:x");
        let mut second = lanes.take("pk", "a", "amqp:x");
        let mut other = lanes.take("pk", "b", "amqp:x");
        let mut elsewhere = lanes.take("pk", "a", "mqtt:t");
        // Another device does not wait, nor the same device's action to another destination.
        tokio::time::timeout(std::time::Duration::from_millis(100), other.wait())
            .await
            .expect("device b has nothing before it");
        tokio::time::timeout(std::time::Duration::from_millis(100), elsewhere.wait())
            .await
            .expect("device a has nothing before it at mqtt:t");
        // The same device waits until the first action is done.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), second.wait()).await;
        assert!(
            waited.is_err(),
            "the second action went before the first ended"
        );
        drop(first);
        tokio::time::timeout(std::time::Duration::from_millis(100), second.wait())
            .await
            .expect("the second action goes once the first ended");
    }

    #[tokio::test]
    async fn prune_keeps_the_lanes_in_flight() {
        let mut lanes = Lanes::default();
        let mut held = Vec::new();
        for i in 0..2000 {
            let turn = lanes.take("pk", &format!("d{i}"), "amqp:x");
            if i % 2 == 0 {
                held.push(turn);
            }
        }
        lanes.prune();
        assert_eq!(lanes.len(), 1000);
        drop(held);
    }

    #[tokio::test]
    async fn turns_enter_in_order() {
        let mut turns = Turns::default();
        let mut first = turns.take();
        let mut second = turns.take();
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(50), second.wait()).await;
        assert!(blocked.is_err(), "the second turn went before the first");
        first.wait().await;
        first.entered();
        tokio::time::timeout(std::time::Duration::from_millis(100), second.wait())
            .await
            .expect("the second turn goes once the first entered");
    }
}
