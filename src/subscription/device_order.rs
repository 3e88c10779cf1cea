//! A group's ready messages per device, for `[[group]] ordering = "device"`
//! (docs/ordering.md).
//!
//! Each device (productKey + deviceName) has a queue of its messages in backlog order, and at
//! most one of them is out (handed to a consumer connection and not yet settled). A device is
//! *runnable* when it has a message waiting and none out; only runnable devices are handed
//! out, so a device's next message waits for its earlier one's outcome, and a message that
//! comes back (released, timed out, its consumer gone) goes to the front of its device's
//! queue, before the later ones. Other devices keep flowing.
//!
//! Which consumer a device goes to is [`rank`]ed by rendezvous hashing over the connections:
//! it stays on one connection while that connection is there, and only the devices of a
//! connection that leaves (or some, towards one that joins) move.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use super::group::Pending;

/// A device: product key and device name.
pub(super) type Device = (String, String);

/// The device of a pending delivery.
pub(super) fn device_of(p: &Pending) -> Device {
    (
        p.delivery.product_key.clone(),
        p.delivery.device_name.clone(),
    )
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Pending>,
    /// One of its messages is out with a consumer.
    out: bool,
}

/// What to do with a runnable device's first message, as the caller decides.
pub(super) enum Pick {
    /// Hand it to the consumer at this index.
    To(usize),
    /// Its consumer has no room now: the device waits.
    Wait,
}

/// The ready messages of an ordered group, by device; see the module docs.
#[derive(Default)]
pub(super) struct ByDevice {
    lanes: HashMap<Device, Lane>,
    /// The devices with a message waiting and none out, roughly in the order they became so.
    runnable: VecDeque<Device>,
    /// Messages waiting (not out) over all devices.
    len: usize,
}

impl ByDevice {
    /// Messages waiting, over all devices.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// A message from the backlog, behind its device's earlier ones.
    pub(super) fn push_back(&mut self, p: Pending) {
        let key = device_of(&p);
        let lane = self.lanes.entry(key.clone()).or_default();
        if !lane.out && lane.queue.is_empty() {
            self.runnable.push_back(key);
        }
        lane.queue.push_back(p);
        self.len += 1;
    }

    /// A message that was out comes back (to be handed out again): first in its device's
    /// queue, and the device first to go.
    pub(super) fn put_back(&mut self, p: Pending) {
        let key = device_of(&p);
        let lane = self.lanes.entry(key.clone()).or_default();
        let was_runnable = !lane.out && !lane.queue.is_empty();
        lane.out = false;
        lane.queue.push_front(p);
        self.len += 1;
        if was_runnable {
            // Cannot happen while one message per device is out; kept consistent anyway.
            self.runnable.retain(|k| *k != key);
        }
        self.runnable.push_front(key);
    }

    /// The device's message that was out is settled for good (or given up to RabbitMQ):
    /// its next one may go.
    pub(super) fn settled(&mut self, key: &Device) {
        let Entry::Occupied(mut lane) = self.lanes.entry(key.clone()) else {
            return;
        };
        if !lane.get().out {
            return;
        }
        lane.get_mut().out = false;
        if lane.get().queue.is_empty() {
            lane.remove();
        } else {
            self.runnable.push_back(key.clone());
        }
    }

    /// The next message to hand out and the consumer it goes to: the first runnable device
    /// whose consumer `pick` says has room. Devices that must wait keep their place behind the
    /// others. The message is out from here until [`ByDevice::settled`] or
    /// [`ByDevice::put_back`].
    pub(super) fn take(
        &mut self,
        mut pick: impl FnMut(&Device, &Pending) -> Pick,
    ) -> Option<(Pending, usize)> {
        for _ in 0..self.runnable.len() {
            let key = self.runnable.pop_front().expect("counted");
            let lane = self
                .lanes
                .get_mut(&key)
                .expect("a runnable device has a lane");
            let head = lane.queue.front().expect("a runnable device has a message");
            match pick(&key, head) {
                Pick::To(i) => {
                    let p = lane.queue.pop_front().expect("has a head");
                    lane.out = true;
                    self.len -= 1;
                    return Some((p, i));
                }
                Pick::Wait => self.runnable.push_back(key),
            }
        }
        None
    }

    /// Removes the waiting messages `keep` says no to (each device's queue keeps its order),
    /// returning them.
    pub(super) fn remove_unless(&mut self, mut keep: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
        let mut removed = Vec::new();
        self.lanes.retain(|_, lane| {
            let (kept, gone): (VecDeque<Pending>, VecDeque<Pending>) =
                lane.queue.drain(..).partition(|p| keep(p));
            lane.queue = kept;
            removed.extend(gone);
            lane.out || !lane.queue.is_empty()
        });
        self.len -= removed.len();
        let lanes = &self.lanes;
        self.runnable
            .retain(|k| lanes.get(k).is_some_and(|l| !l.out && !l.queue.is_empty()));
        removed
    }

    /// Removes from the front of each device's waiting queue the messages `expired` says are,
    /// returning them (within a device, later messages are younger, so the front is enough).
    pub(super) fn expire(&mut self, mut expired: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
        let mut removed = Vec::new();
        for lane in self.lanes.values_mut() {
            while lane.queue.front().is_some_and(&mut expired) {
                removed.extend(lane.queue.pop_front());
            }
        }
        if !removed.is_empty() {
            self.len -= removed.len();
            self.lanes.retain(|_, l| l.out || !l.queue.is_empty());
            let lanes = &self.lanes;
            self.runnable
                .retain(|k| lanes.get(k).is_some_and(|l| !l.out && !l.queue.is_empty()));
        }
        removed
    }
}

/// The consumer (by id) `device` goes to: the highest of rendezvous hashing over
/// `consumers`, so a device keeps its consumer while that consumer stays, whoever else comes
/// and goes. A redelivery away from `avoid` (the consumer that released it or let it time
/// out) takes the device's second choice when there is one.
pub(super) fn preferred(
    device: &Device,
    consumers: impl Iterator<Item = u64>,
    avoid: Option<u64>,
) -> Option<u64> {
    let score = |id: u64| {
        let mut h = std::hash::DefaultHasher::new();
        device.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    // (score, id) of the best two.
    let mut first: Option<(u64, u64)> = None;
    let mut second: Option<(u64, u64)> = None;
    for id in consumers {
        let s = (score(id), id);
        if first.is_none_or(|f| s > f) {
            second = first;
            first = Some(s);
        } else if second.is_none_or(|f| s > f) {
            second = Some(s);
        }
    }
    match (first, second) {
        (Some((_, best)), Some((_, next))) if Some(best) == avoid => Some(next),
        (best, _) => best.map(|(_, id)| id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_moves_only_when_its_consumer_leaves_or_a_newcomer_outranks_it() {
        let devices: Vec<Device> = (0..1000).map(|i| ("p".into(), format!("d{i}"))).collect();
        let at = |ids: &[u64]| -> Vec<u64> {
            devices
                .iter()
                .map(|d| preferred(d, ids.iter().copied(), None).unwrap())
                .collect()
        };
        let three = at(&[1, 2, 3]);
        for id in [1, 2, 3] {
            let n = three.iter().filter(|c| **c == id).count();
            assert!(
                (200..=470).contains(&n),
                "consumer {id} has {n} of 1000 devices"
            );
        }
        // Consumer 2 leaves: only its devices move.
        let two = at(&[1, 3]);
        for (before, after) in three.iter().zip(&two) {
            if *before != 2 {
                assert_eq!(before, after);
            }
        }
        // Consumer 4 joins: a device moves only to it.
        let four = at(&[1, 2, 3, 4]);
        for (before, after) in three.iter().zip(&four) {
            assert!(before == after || *after == 4);
        }
        // A redelivery avoids the consumer it came from, when there is another.
        let d = &devices[0];
        let first = preferred(d, [1, 2, 3].into_iter(), None).unwrap();
        let second = preferred(d, [1, 2, 3].into_iter(), Some(first)).unwrap();
        assert_ne!(first, second);
        assert_eq!(preferred(d, [7].into_iter(), Some(7)), Some(7));
        assert_eq!(preferred(d, std::iter::empty(), None), None);
    }
}
