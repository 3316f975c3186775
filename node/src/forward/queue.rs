//! The bounded queue of messages waiting for one peer's link. Publishers never wait on it: when
//! it is full, a QoS 0 message is dropped first (the new one, or the oldest queued), otherwise the
//! oldest message; every drop is counted. A slow or dead peer thus never stalls local publishers.

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

#[derive(Debug)]
pub struct PeerQueue {
    messages: Mutex<VecDeque<Outgoing>>,
    capacity: usize,
    readable: Notify,
    /// Messages dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl PeerQueue {
    pub fn new(capacity: usize) -> PeerQueue {
        PeerQueue { messages: Mutex::new(VecDeque::new()), capacity: capacity.max(1), readable: Notify::new(), dropped: AtomicU64::new(0) }
    }

    /// Queues a message without waiting, applying the overflow policy.
    pub fn push(&self, message: Outgoing) {
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
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
        drop(messages);
        self.readable.notify_one();
    }

    pub fn pop(&self) -> Option<Outgoing> {
        self.messages.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
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
        self.messages.lock().unwrap_or_else(|p| p.into_inner()).len()
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
        std::iter::from_fn(|| queue.pop()).map(|m| m.message.payload[0]).collect()
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
