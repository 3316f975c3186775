//! A session's queue of messages waiting to be written to its client.
//!
//! The mailbox belongs to the session, not to the connection: while the client is offline a
//! persistent session keeps collecting QoS 1/2 messages here. Publishers push into it directly,
//! taking only this session's short lock. Capacity is bounded; what happens at the bound is
//! explicit and counted:
//! - online subscriber, QoS 0: the message is dropped (`slow_subscriber_qos0`),
//! - online subscriber, QoS 1/2: the publisher waits for room (flow control) up to a timeout,
//!   then the oldest queued message is dropped (`slow_subscriber_timeout`),
//! - offline session: QoS 0 is not queued (`offline_qos0`); QoS 1/2 drops the oldest (`queue_full`).

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
            state: Mutex::new(State { queue: VecDeque::new(), capacity: capacity.max(1), online: false, closed: false }),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pushes without waiting; for an online session with a full queue a QoS 1/2 delivery is
    /// handed back so the caller can wait with [`Mailbox::push_wait`].
    pub fn try_push(&self, delivery: Delivery) -> Result<Pushed, Delivery> {
        let mut state = self.lock();
        if state.closed {
            return Ok(Pushed::Closed);
        }
        let full = state.queue.len() >= state.capacity;
        let qos0 = delivery.qos == QoS::AtMostOnce;
        let outcome = if !full && (state.online || !qos0) {
            state.queue.push_back(delivery);
            metrics::queued(1);
            Pushed::Queued
        } else if state.online && !qos0 {
            return Err(delivery);
        } else if qos0 {
            metrics::dropped(if state.online { DropReason::SlowSubscriberQos0 } else { DropReason::OfflineQos0 });
            Pushed::Dropped
        } else {
            drop(state);
            return Ok(self.push_dropping_oldest(delivery, DropReason::QueueFull));
        };
        drop(state);
        if outcome == Pushed::Queued {
            self.readable.notify_one();
        }
        Ok(outcome)
    }

    /// Pushes a QoS 1/2 delivery, waiting up to `timeout` for room; past it the oldest queued
    /// message makes room.
    pub async fn push_wait(&self, mut delivery: Delivery, timeout: Duration) -> Pushed {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            match self.try_push(delivery) {
                Ok(outcome) => return outcome,
                Err(back) => delivery = back,
            }
            if tokio::time::timeout_at(deadline, writable).await.is_err() {
                return self.push_dropping_oldest(delivery, DropReason::SlowSubscriberTimeout);
            }
        }
    }

    /// Pushes, dropping the oldest queued message (counted as `reason`) when the queue is full.
    pub fn push_dropping_oldest(&self, delivery: Delivery, reason: DropReason) -> Pushed {
        let mut state = self.lock();
        if state.closed {
            return Pushed::Closed;
        }
        let outcome = if state.queue.len() >= state.capacity {
            state.queue.pop_front();
            metrics::dropped(reason);
            Pushed::QueuedDroppedOldest
        } else {
            metrics::queued(1);
            Pushed::Queued
        };
        state.queue.push_back(delivery);
        drop(state);
        self.readable.notify_one();
        outcome
    }

    /// Takes the oldest queued delivery.
    pub fn pop(&self) -> Option<Delivery> {
        let mut state = self.lock();
        let was_full = state.queue.len() >= state.capacity;
        let delivery = state.queue.pop_front();
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
