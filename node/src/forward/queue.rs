//! The bounded queue of messages waiting for one peer's link, with the back-pressure of a slow
//! local subscriber: while the peer's link is up, a publisher that finds the queue full waits for
//! room (up to the slow-subscriber timeout). A peer that stays full that long is *congested*:
//! until its queue drains to half, nobody waits for it. Without waiting — congested, link down,
//! or past the wait — a full queue drops a QoS 0 message first (the new one, or the oldest
//! queued), otherwise the oldest message; every drop is counted. So a slow peer slows its
//! publishers as a slow subscriber does, and a dead or cut-off one never stalls anybody.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mqttbytes::QoS;
use tokio::sync::Notify;

use crate::broker::message::Message;
use crate::broker::retained::Stamp;
use crate::broker::RemoteAcks;
use crate::forward::frame::Recipients;

/// A message waiting for a peer, with its retained-store stamp when it is retained, and whom it
/// is for there.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub message: Arc<Message>,
    pub retained: Option<Stamp>,
    pub recipients: Recipients,
    /// The publisher's wait for this peer's acknowledgement (PUBACK policy `cluster`).
    pub acks: Option<Arc<RemoteAcks>>,
}

#[derive(Debug, Default)]
struct State {
    messages: VecDeque<Outgoing>,
    /// Set when a publisher waited for room in vain; cleared at half capacity.
    congested: bool,
}

#[derive(Debug)]
pub struct PeerQueue {
    state: Mutex<State>,
    capacity: usize,
    readable: Notify,
    writable: Notify,
    /// Messages dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl PeerQueue {
    pub fn new(capacity: usize) -> PeerQueue {
        PeerQueue {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            readable: Notify::new(),
            writable: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message when there is room; a full queue of a `live` peer that is not congested
    /// hands it back, for the publisher to wait ([`PeerQueue::push_wait`]); otherwise the
    /// overflow policy applies.
    pub fn try_push(&self, message: Outgoing, live: bool) -> Result<(), Outgoing> {
        let state = self.lock();
        if state.messages.len() >= self.capacity && live && !state.congested {
            return Err(message);
        }
        self.push_locked(state, message);
        Ok(())
    }

    /// Queues a message, waiting for room until `deadline` while the peer is `live`; past it the
    /// peer is congested and the overflow policy applies.
    pub async fn push_wait(&self, mut message: Outgoing, deadline: tokio::time::Instant, live: impl Fn() -> bool) {
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            match self.try_push(message, live()) {
                Ok(()) => return,
                Err(back) => message = back,
            }
            if tokio::time::timeout_at(deadline, writable).await.is_err() {
                let mut state = self.lock();
                state.congested = true;
                return self.push_locked(state, message);
            }
        }
    }

    /// Wakes the publishers waiting for room: the peer's link went down, they wait no longer.
    pub fn release_waiting(&self) {
        self.writable.notify_waiters();
    }

    /// Queues a message without waiting, applying the overflow policy.
    pub fn push(&self, message: Outgoing) {
        self.push_locked(self.lock(), message)
    }

    fn push_locked(&self, mut state: std::sync::MutexGuard<'_, State>, message: Outgoing) {
        let messages = &mut state.messages;
        if messages.len() >= self.capacity {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if message.message.qos == QoS::AtMostOnce {
                return;
            }
            let dropped = match messages.iter().position(|m| m.message.qos == QoS::AtMostOnce) {
                Some(i) => messages.remove(i),
                None => messages.pop_front(),
            };
            if let Some(acks) = dropped.and_then(|m| m.acks) {
                acks.lost();
            }
        }
        messages.push_back(message);
        drop(state);
        self.readable.notify_one();
    }

    /// Moves up to `max` of the oldest messages into `out`, under one lock.
    pub fn pop_into(&self, out: &mut Vec<Outgoing>, max: usize) {
        let mut state = self.lock();
        let was_full = state.messages.len() >= self.capacity;
        let taken = max.min(state.messages.len());
        out.extend(state.messages.drain(..taken));
        if state.congested && state.messages.len() <= self.capacity / 2 {
            state.congested = false;
        }
        drop(state);
        if was_full && taken > 0 {
            self.writable.notify_waiters();
        }
    }

    /// Waits until something may have been queued.
    pub async fn readable(&self) {
        self.readable.notified().await
    }

    /// Wakes the reader again (it left messages behind to give other work a turn).
    pub fn wake(&self) {
        self.readable.notify_one();
    }

    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(qos: QoS, n: u8) -> Outgoing {
        let message = Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from(vec![n]),
            qos,
            retain: false,
            properties: None,
            expires_at: None,
            publisher: None,
            id: None,
        });
        Outgoing { message, retained: None, recipients: Recipients::SUBSCRIBERS, acks: None }
    }

    fn drain(queue: &PeerQueue) -> Vec<u8> {
        let mut out = Vec::new();
        queue.pop_into(&mut out, usize::MAX);
        out.iter().map(|m| m.message.payload[0]).collect()
    }

    fn pop(queue: &PeerQueue) -> Option<u8> {
        let mut out = Vec::new();
        queue.pop_into(&mut out, 1);
        out.first().map(|m| m.message.payload[0])
    }

    #[test]
    fn qos0_is_dropped_first_and_every_drop_counted() {
        let queue = PeerQueue::new(3);
        queue.push(message(QoS::AtLeastOnce, 1));
        queue.push(message(QoS::AtMostOnce, 2));
        queue.push(message(QoS::AtLeastOnce, 3));
        queue.push(message(QoS::AtMostOnce, 4));
        queue.push(message(QoS::AtLeastOnce, 5));
        queue.push(message(QoS::AtLeastOnce, 6));
        assert_eq!(drain(&queue), [3, 5, 6]);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_publisher_waits_for_a_live_peer_and_a_stuck_one_becomes_congested() {
        let queue = std::sync::Arc::new(PeerQueue::new(2));
        for n in 1..=2 {
            queue.try_push(message(QoS::AtMostOnce, n), true).unwrap();
        }
        assert!(queue.try_push(message(QoS::AtMostOnce, 3), true).is_err(), "full and live: the publisher waits");
        assert!(queue.try_push(message(QoS::AtMostOnce, 3), false).is_ok(), "full and down: dropped, nobody waits");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push_wait(message(QoS::AtMostOnce, 4), deadline, || true).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(pop(&queue), Some(1));
        waiting.await.unwrap();
        assert_eq!(drain(&queue), [2, 4]);
        // Nobody drains it: the wait ends at the deadline, and then nobody waits until half drained.
        for n in 5..=6 {
            queue.push(message(QoS::AtLeastOnce, n));
        }
        queue.push_wait(message(QoS::AtLeastOnce, 7), tokio::time::Instant::now() + std::time::Duration::from_millis(20), || true).await;
        assert!(queue.try_push(message(QoS::AtLeastOnce, 8), true).is_ok(), "congested: no wait");
        assert_eq!(drain(&queue), [7, 8]);
        assert!(queue.try_push(message(QoS::AtLeastOnce, 9), true).is_ok());
        assert!(queue.try_push(message(QoS::AtLeastOnce, 10), true).is_ok());
        assert!(queue.try_push(message(QoS::AtLeastOnce, 11), true).is_err(), "drained: waits again");
    }

    #[test]
    fn a_dropped_message_is_lost_to_its_waiting_publisher() {
        let queue = PeerQueue::new(1);
        let acks = Arc::new(RemoteAcks::new(1));
        queue.push(Outgoing { acks: Some(acks.clone()), ..message(QoS::AtLeastOnce, 1) });
        queue.push(message(QoS::AtLeastOnce, 2));
        assert!(acks.is_lost());
        assert_eq!(drain(&queue), [2]);
    }
}
