//! A session's queue of messages waiting to be written to its client.
//!
//! The mailbox belongs to the session, not to the connection: while the client is offline a
//! persistent session keeps collecting QoS 1/2 messages here. Publishers push into it directly,
//! taking only this session's short lock. Capacity is bounded; what happens at the bound is
//! explicit and counted:
//! - online subscriber: the publisher waits for room (flow control, at every QoS) up to a
//!   timeout. A subscriber that stays full that long is marked *congested*: until it drains to
//!   half its capacity, pushes do not wait — QoS 0 is dropped (`slow_subscriber_qos0`) and QoS 1/2
//!   replaces the oldest queued message (`slow_subscriber_timeout`);
//! - offline session: QoS 0 is not queued (`offline_qos0`); QoS 1/2 replaces the oldest
//!   (`queue_full`).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use mqttbytes::QoS;
use tokio::sync::Notify;

use super::message::Delivery;
use crate::telemetry::metrics::{self, DropReason};

/// What happened to a pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued after dropping the oldest message.
    QueuedDroppedOldest,
    Dropped,
    /// The session has ended; nothing was queued.
    Closed,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Delivery>,
    capacity: usize,
    online: bool,
    closed: bool,
    /// Set when a publisher timed out waiting for room; cleared at half capacity.
    congested: bool,
}

impl State {
    /// Queues without waiting, applying the overflow policy; `Err` hands back a delivery the
    /// caller may wait to queue (online, full, not congested).
    fn push(&mut self, delivery: Delivery) -> Result<Pushed, Delivery> {
        if self.closed {
            return Ok(Pushed::Closed);
        }
        let qos0 = delivery.qos == QoS::AtMostOnce;
        if !self.online && qos0 {
            metrics::dropped(DropReason::OfflineQos0);
            return Ok(Pushed::Dropped);
        }
        if self.queue.len() < self.capacity {
            self.queue.push_back(delivery);
            metrics::queued(1);
            return Ok(Pushed::Queued);
        }
        if self.online && !self.congested {
            return Err(delivery);
        }
        if qos0 {
            metrics::dropped(DropReason::SlowSubscriberQos0);
            return Ok(Pushed::Dropped);
        }
        self.queue.pop_front();
        self.queue.push_back(delivery);
        metrics::dropped(if self.online { DropReason::SlowSubscriberTimeout } else { DropReason::QueueFull });
        Ok(Pushed::QueuedDroppedOldest)
    }
}

#[derive(Debug)]
pub struct Mailbox {
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
}

impl Mailbox {
    pub fn new(capacity: usize) -> Mailbox {
        Mailbox {
            state: Mutex::new(State { queue: VecDeque::new(), capacity: capacity.max(1), online: false, closed: false, congested: false }),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_reader(&self, pushed: Pushed) -> Pushed {
        if matches!(pushed, Pushed::Queued | Pushed::QueuedDroppedOldest) {
            self.readable.notify_one();
        }
        pushed
    }

    /// Pushes without waiting; `Err` hands back a delivery for an online session whose queue is
    /// full, so the caller can wait with [`Mailbox::push_wait`].
    pub fn try_push(&self, delivery: Delivery) -> Result<Pushed, Delivery> {
        let pushed = self.lock().push(delivery)?;
        Ok(self.wake_reader(pushed))
    }

    /// Pushes, waiting up to `timeout` for room; past it the session is marked congested and the
    /// overflow policy applies.
    pub async fn push_wait(&self, mut delivery: Delivery, timeout: Duration) -> Pushed {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            match self.try_push(delivery) {
                Ok(pushed) => return pushed,
                Err(back) => delivery = back,
            }
            if tokio::time::timeout_at(deadline, writable).await.is_err() {
                return self.push_congested(delivery);
            }
        }
    }

    /// Pushes without ever waiting: a full queue is treated as congested. For a publisher's own
    /// session, which cannot drain its queue while it waits.
    pub fn push_congested(&self, delivery: Delivery) -> Pushed {
        let mut state = self.lock();
        state.congested = true;
        let pushed = state.push(delivery).unwrap_or(Pushed::Dropped);
        drop(state);
        self.wake_reader(pushed)
    }

    /// Takes the oldest queued delivery.
    pub fn pop(&self) -> Option<Delivery> {
        let mut state = self.lock();
        let was_full = state.queue.len() >= state.capacity;
        let delivery = state.queue.pop_front();
        if state.congested && state.queue.len() <= state.capacity / 2 {
            state.congested = false;
        }
        drop(state);
        if delivery.is_some() {
            metrics::queued(-1);
        }
        if was_full && delivery.is_some() {
            self.writable.notify_waiters();
        }
        delivery
    }

    /// Waits until something may be queued (spurious wake-ups are possible).
    pub async fn readable(&self) {
        self.readable.notified().await
    }

    /// A copy of the queued messages, oldest first (for the session store).
    pub fn snapshot(&self) -> Vec<Delivery> {
        self.lock().queue.iter().cloned().collect()
    }

    /// Changes the capacity (the client type decides it at CONNECT); messages beyond a smaller
    /// capacity stay queued.
    pub fn set_capacity(&self, capacity: usize) {
        self.lock().capacity = capacity.max(1);
    }

    /// Marks the session as having a connected client (or not).
    pub fn set_online(&self, online: bool) {
        self.lock().online = online;
        if !online {
            self.writable.notify_waiters();
        }
    }

    pub fn is_online(&self) -> bool {
        self.lock().online
    }

    /// Ends the session: queued messages are discarded and later pushes refused.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        metrics::queued(-(state.queue.len() as i64));
        state.queue.clear();
        drop(state);
        self.writable.notify_waiters();
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Message;
    use bytes::Bytes;
    use std::sync::Arc;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        let message = Message {
            topic: "t".into(),
            payload: Bytes::from(vec![n]),
            qos,
            retain: false,
            properties: None,
            expires_at: None,
            publisher: None,
        };
        Delivery { message: Arc::new(message), qos, retain: false, subscription_ids: Vec::new() }
    }

    fn payloads(mailbox: &Mailbox) -> Vec<u8> {
        std::iter::from_fn(|| mailbox.pop()).map(|d| d.message.payload[0]).collect()
    }

    #[test]
    fn offline_sessions_keep_the_newest_qos1_and_no_qos0() {
        let mailbox = Mailbox::new(2);
        assert_eq!(mailbox.try_push(delivery(QoS::AtMostOnce, 0)).ok(), Some(Pushed::Dropped));
        for n in 1..=3 {
            mailbox.try_push(delivery(QoS::AtLeastOnce, n)).unwrap();
        }
        assert_eq!(payloads(&mailbox), [2, 3]);
    }

    #[test]
    fn online_full_queue_asks_the_publisher_to_wait() {
        let mailbox = Mailbox::new(1);
        mailbox.set_online(true);
        mailbox.try_push(delivery(QoS::AtMostOnce, 1)).unwrap();
        assert!(mailbox.try_push(delivery(QoS::AtMostOnce, 2)).is_err());
        assert!(mailbox.try_push(delivery(QoS::AtLeastOnce, 3)).is_err());
    }

    #[tokio::test]
    async fn a_waiting_publisher_gets_in_when_the_reader_drains() {
        let mailbox = Arc::new(Mailbox::new(1));
        mailbox.set_online(true);
        mailbox.try_push(delivery(QoS::AtLeastOnce, 1)).unwrap();
        let waiter = tokio::spawn({
            let mailbox = mailbox.clone();
            async move { mailbox.push_wait(delivery(QoS::AtLeastOnce, 2), Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(mailbox.pop().unwrap().message.payload[0], 1);
        assert_eq!(waiter.await.unwrap(), Pushed::Queued);
        assert_eq!(payloads(&mailbox), [2]);
    }

    #[tokio::test]
    async fn a_stuck_subscriber_becomes_congested_until_half_drained() {
        let mailbox = Mailbox::new(4);
        mailbox.set_online(true);
        for n in 0..4 {
            mailbox.try_push(delivery(QoS::AtLeastOnce, n)).unwrap();
        }
        let pushed = mailbox.push_wait(delivery(QoS::AtLeastOnce, 4), Duration::from_millis(20)).await;
        assert_eq!(pushed, Pushed::QueuedDroppedOldest);
        assert_eq!(mailbox.try_push(delivery(QoS::AtMostOnce, 9)).ok(), Some(Pushed::Dropped));
        assert_eq!(mailbox.try_push(delivery(QoS::AtLeastOnce, 5)).ok(), Some(Pushed::QueuedDroppedOldest));
        mailbox.pop();
        mailbox.pop();
        assert!(mailbox.try_push(delivery(QoS::AtLeastOnce, 6)).is_ok());
        assert!(mailbox.try_push(delivery(QoS::AtLeastOnce, 7)).is_ok());
        assert!(mailbox.try_push(delivery(QoS::AtLeastOnce, 8)).is_err(), "no longer congested: waits again");
    }

    #[test]
    fn closed_mailboxes_refuse() {
        let mailbox = Mailbox::new(4);
        mailbox.try_push(delivery(QoS::AtLeastOnce, 1)).unwrap();
        mailbox.close();
        assert!(mailbox.is_empty());
        assert_eq!(mailbox.try_push(delivery(QoS::AtLeastOnce, 2)).ok(), Some(Pushed::Closed));
    }
}
