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
//!
//! The mailbox of an offline durable session also writes what it queues and drops to the session
//! store, under its lock, so the store sees the queue's changes in the order they happened.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use mqttbytes::QoS;
use tokio::sync::Notify;

use super::message::{Delivery, MessageId};
use super::persist::{StoreHandle, StoreOp, StoredMessage, StoredSession};
use crate::telemetry::metrics::{self, DropReason};

/// What happened to a pushed delivery. A queued message of an offline durable session carries
/// the ticket of its store write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued(Option<u64>),
    /// Queued after dropping the oldest message.
    QueuedDroppedOldest(Option<u64>),
    Dropped,
    /// The session has ended; nothing was queued.
    Closed,
}

impl Pushed {
    pub fn is_queued(self) -> bool {
        matches!(self, Pushed::Queued(_) | Pushed::QueuedDroppedOldest(_))
    }

    /// The store write the publisher must wait for before acknowledging, if any.
    pub fn ticket(self) -> Option<u64> {
        match self {
            Pushed::Queued(ticket) | Pushed::QueuedDroppedOldest(ticket) => ticket,
            Pushed::Dropped | Pushed::Closed => None,
        }
    }
}

/// Where an offline durable session's queue is written.
#[derive(Debug)]
struct Persist {
    client_id: Arc<str>,
    store: StoreHandle,
    /// The identities of the queued messages: a message that reaches the stored queue again
    /// (a link re-sends what this node had stored but not yet acknowledged when it was killed)
    /// is queued once.
    queued: HashSet<MessageId>,
}

impl Persist {
    fn new(client_id: Arc<str>, store: StoreHandle, queue: &VecDeque<(u64, Delivery)>) -> Persist {
        Persist { client_id, store, queued: queue.iter().filter_map(|(_, d)| d.message.id).collect() }
    }

    fn dequeue(&mut self, sequence: u64, delivery: &Delivery) {
        if let Some(id) = delivery.message.id {
            self.queued.remove(&id);
        }
        self.store.submit(StoreOp::Dequeue { client_id: self.client_id.clone(), sequence });
    }
}

#[derive(Debug)]
struct State {
    /// Queued deliveries with their sequence numbers (their keys in the session store).
    queue: VecDeque<(u64, Delivery)>,
    next_sequence: u64,
    persist: Option<Persist>,
    capacity: usize,
    online: bool,
    closed: bool,
    /// Set when a publisher timed out waiting for room; cleared at half capacity.
    congested: bool,
    /// While the session moves here from another node: the messages queued so far, by identity,
    /// so one that arrives both directly and with the old node's tail is queued once.
    moving_in: Option<HashSet<MessageId>>,
}

impl State {
    /// Queues without waiting, applying the overflow policy; `Err` hands back a delivery the
    /// caller may wait to queue (online, full, not congested).
    fn push(&mut self, delivery: Delivery) -> Result<Pushed, Delivery> {
        if self.closed {
            return Ok(Pushed::Closed);
        }
        if let Some(id) = delivery.message.id {
            let moved_in = self.moving_in.as_ref().is_some_and(|seen| seen.contains(&id));
            let stored = self.persist.as_ref().is_some_and(|p| p.queued.contains(&id));
            if moved_in || stored {
                metrics::dropped(DropReason::MoveDuplicate);
                return Ok(Pushed::Dropped);
            }
        }
        let qos0 = delivery.qos == QoS::AtMostOnce;
        if !self.online && qos0 {
            metrics::dropped(DropReason::OfflineQos0);
            return Ok(Pushed::Dropped);
        }
        if self.queue.len() < self.capacity {
            metrics::queued(1);
            return Ok(Pushed::Queued(self.append(delivery)));
        }
        if self.online && !self.congested {
            return Err(delivery);
        }
        if qos0 {
            metrics::dropped(DropReason::SlowSubscriberQos0);
            return Ok(Pushed::Dropped);
        }
        if let Some((sequence, oldest)) = self.queue.pop_front() {
            if let Some(p) = &mut self.persist {
                p.dequeue(sequence, &oldest);
            }
        }
        metrics::dropped(if self.online { DropReason::SlowSubscriberTimeout } else { DropReason::QueueFull });
        Ok(Pushed::QueuedDroppedOldest(self.append(delivery)))
    }

    /// Queues at the back; returns the ticket of its store write when the session is persisted.
    fn append(&mut self, delivery: Delivery) -> Option<u64> {
        if let (Some(seen), Some(id)) = (&mut self.moving_in, delivery.message.id) {
            seen.insert(id);
        }
        self.next_sequence += 1;
        let sequence = self.next_sequence;
        let ticket = self.persist.as_mut().map(|p| {
            if let Some(id) = delivery.message.id {
                p.queued.insert(id);
            }
            let message = Box::new(StoredMessage::from_delivery(&delivery));
            p.store.submit(StoreOp::Enqueue { client_id: p.client_id.clone(), sequence, message })
        });
        self.queue.push_back((sequence, delivery));
        ticket
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
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_sequence: 0,
                persist: None,
                capacity: capacity.max(1),
                online: false,
                closed: false,
                congested: false,
                moving_in: None,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_reader(&self, pushed: Pushed) -> Pushed {
        if pushed.is_queued() {
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

    /// Pushes, waiting until `deadline` for room; past it the session is marked congested and
    /// the overflow policy applies.
    pub async fn push_wait(&self, mut delivery: Delivery, deadline: tokio::time::Instant) -> Pushed {
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
        let delivery = state.queue.pop_front().map(|(_, d)| d);
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

    /// Takes the queued deliveries this session got as a shared-group member (to give them to
    /// other members); the rest stay queued in order.
    pub fn take_shared(&self) -> Vec<Delivery> {
        let mut state = self.lock();
        let (shared, kept): (VecDeque<_>, VecDeque<_>) = state.queue.drain(..).partition(|(_, d)| d.shared.is_some());
        state.queue = kept;
        if let Some(p) = &mut state.persist {
            for (sequence, delivery) in &shared {
                p.dequeue(*sequence, delivery);
            }
        }
        drop(state);
        metrics::queued(-(shared.len() as i64));
        if !shared.is_empty() {
            self.writable.notify_waiters();
        }
        shared.into_iter().map(|(_, d)| d).collect()
    }

    /// Waits until something may be queued (spurious wake-ups are possible).
    pub async fn readable(&self) {
        self.readable.notified().await
    }

    /// Changes the capacity (the client type decides it at CONNECT); messages beyond a smaller
    /// capacity stay queued.
    pub fn set_capacity(&self, capacity: usize) {
        self.lock().capacity = capacity.max(1);
    }

    /// Marks the session as having a connected client. A persisted queue stops being written
    /// and its stored copy is removed (it is saved again when the session goes offline).
    pub fn set_online(&self) {
        let mut state = self.lock();
        state.online = true;
        if let Some(p) = state.persist.take() {
            p.store.submit(StoreOp::Remove { client_id: p.client_id });
        }
    }

    /// Marks the session as offline. A durable session (`persist`) is saved with its queue,
    /// and every later change of the queue is written too; returns the ticket of the save.
    pub fn set_offline(&self, persist: Option<(Arc<str>, StoreHandle, StoredSession)>) -> Option<u64> {
        let mut state = self.lock();
        state.online = false;
        let ticket = persist.map(|(client_id, store, session)| {
            let queued = state.queue.iter().map(|(seq, d)| (*seq, StoredMessage::from_delivery(d))).collect();
            let ticket = store.submit(StoreOp::Save { client_id: client_id.clone(), session: Box::new(session), queued });
            state.persist = Some(Persist::new(client_id, store, &state.queue));
            ticket
        });
        drop(state);
        self.writable.notify_waiters();
        ticket
    }

    /// Puts back the queue of a durable session read from the store; the session is offline
    /// and its queue persisted.
    pub fn restore(&self, queued: Vec<(u64, Delivery)>, client_id: Arc<str>, store: StoreHandle) {
        let mut state = self.lock();
        state.next_sequence = queued.last().map_or(0, |(seq, _)| *seq);
        metrics::queued(queued.len() as i64);
        state.queue = queued.into();
        state.persist = Some(Persist::new(client_id, store, &state.queue));
    }

    /// Copies of the queued deliveries after sequence `after` (0: all of them), oldest first,
    /// and the sequence of the newest one queued; the queue stays as it is.
    pub fn queued_after(&self, after: u64) -> (Vec<Delivery>, u64) {
        let state = self.lock();
        let copies = state.queue.iter().filter(|(sequence, _)| *sequence > after).map(|(_, d)| d.clone()).collect();
        (copies, state.next_sequence)
    }

    /// Queues another copy's deliveries of this session (without waiting), except those whose
    /// message is already queued here; returns how many it queued.
    pub fn merge(&self, deliveries: Vec<Delivery>) -> usize {
        let queued: HashSet<MessageId> = self.lock().queue.iter().filter_map(|(_, d)| d.message.id).collect();
        let fresh = deliveries.into_iter().filter(|d| d.message.id.is_none_or(|id| !queued.contains(&id)));
        fresh.map(|d| self.push_congested(d)).filter(|pushed| pushed.is_queued()).count()
    }

    /// Starts (`true`) or ends (`false`) the window of a session move during which a message is
    /// queued at most once, however many ways it arrives.
    pub fn set_moving_in(&self, moving: bool) {
        self.lock().moving_in = moving.then(HashSet::new);
    }

    pub fn is_online(&self) -> bool {
        self.lock().online
    }

    /// Ends the session: queued messages are discarded and later pushes refused; a stored copy
    /// is removed.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        if let Some(p) = state.persist.take() {
            p.store.submit(StoreOp::Remove { client_id: p.client_id });
        }
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
    use std::time::Duration;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        let message = Message {
            topic: "t".into(),
            payload: Bytes::from(vec![n]),
            qos,
            retain: false,
            properties: None,
            expires_at: None,
            publisher: None,
            id: None,
        };
        Delivery { message: Arc::new(message), qos, retain: false, subscription_ids: Vec::new(), shared: None }
    }

    fn with_id(mut delivery: Delivery, number: u64) -> Delivery {
        let message = Arc::get_mut(&mut delivery.message).expect("unshared");
        message.id = Some(MessageId { node: 3, number });
        delivery
    }

    #[test]
    fn while_a_session_moves_in_a_message_is_queued_once_however_it_arrives() {
        let mailbox = Mailbox::new(10);
        mailbox.set_moving_in(true);
        mailbox.try_push(with_id(delivery(QoS::ExactlyOnce, 1), 1)).unwrap();
        // The same message again with the old node's tail, then one only the tail has.
        assert_eq!(mailbox.push_congested(with_id(delivery(QoS::ExactlyOnce, 1), 1)), Pushed::Dropped);
        mailbox.push_congested(with_id(delivery(QoS::ExactlyOnce, 2), 2));
        // Its direct copy arriving late is recognised too; a message without identity is kept.
        assert_eq!(mailbox.try_push(with_id(delivery(QoS::ExactlyOnce, 2), 2)).ok(), Some(Pushed::Dropped));
        mailbox.try_push(delivery(QoS::ExactlyOnce, 3)).unwrap();
        assert_eq!(payloads(&mailbox), [1, 2, 3]);
        mailbox.set_moving_in(false);
        mailbox.try_push(with_id(delivery(QoS::ExactlyOnce, 1), 1)).unwrap();
        assert_eq!(payloads(&mailbox), [1], "after the move nothing is remembered");
    }

    #[test]
    fn a_copy_of_the_queue_leaves_it_as_it_is_and_a_merge_adds_only_what_is_missing() {
        let mailbox = Mailbox::new(10);
        for n in 1..=3 {
            mailbox.try_push(with_id(delivery(QoS::AtLeastOnce, n), n.into())).unwrap();
        }
        let (all, through) = mailbox.queued_after(0);
        assert_eq!((all.len(), through), (3, 3));
        mailbox.try_push(with_id(delivery(QoS::AtLeastOnce, 4), 4)).unwrap();
        let (tail, through) = mailbox.queued_after(through);
        assert_eq!((tail.iter().map(|d| d.message.payload[0]).collect::<Vec<_>>(), through), (vec![4], 4));
        let other = [2, 5].map(|n| with_id(delivery(QoS::AtLeastOnce, n), n.into())).to_vec();
        assert_eq!(mailbox.merge(other), 1);
        assert_eq!(payloads(&mailbox), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_stored_queue_takes_a_message_once_however_often_it_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::broker::persist::SessionStore::open(dir.path()).unwrap();
        let mailbox = Mailbox::new(10);
        mailbox.restore(vec![(1, with_id(delivery(QoS::ExactlyOnce, 1), 1))], "c".into(), store.handle().clone());
        // A link re-sends what was stored but not acknowledged before a restart.
        assert_eq!(mailbox.try_push(with_id(delivery(QoS::ExactlyOnce, 1), 1)).ok(), Some(Pushed::Dropped));
        assert!(mailbox.try_push(with_id(delivery(QoS::ExactlyOnce, 2), 2)).unwrap().is_queued());
        assert_eq!(mailbox.try_push(with_id(delivery(QoS::ExactlyOnce, 2), 2)).ok(), Some(Pushed::Dropped));
        assert!(mailbox.try_push(delivery(QoS::ExactlyOnce, 3)).unwrap().is_queued(), "no identity: kept");
        mailbox.set_online();
        assert_eq!(payloads(&mailbox), [1, 2, 3]);
    }

    #[test]
    fn a_message_waiting_for_room_is_not_taken_for_its_own_duplicate() {
        let mailbox = Mailbox::new(1);
        mailbox.set_online();
        mailbox.set_moving_in(true);
        mailbox.try_push(with_id(delivery(QoS::AtLeastOnce, 1), 1)).unwrap();
        let back = mailbox.try_push(with_id(delivery(QoS::AtLeastOnce, 2), 2)).expect_err("full: the publisher waits");
        assert_eq!(payloads(&mailbox), [1]);
        assert!(mailbox.try_push(back).unwrap().is_queued());
        assert_eq!(payloads(&mailbox), [2]);
    }

    #[test]
    fn shared_group_deliveries_are_taken_out_and_the_rest_keep_their_order() {
        let mailbox = Mailbox::new(10);
        mailbox.set_online();
        for n in 1..=4 {
            let mut d = delivery(QoS::AtLeastOnce, n);
            if n % 2 == 0 {
                let route = "$share/g/t".into();
                d.shared = Some(Box::new(crate::broker::message::SharedDelivery { route, tried: Vec::new(), passed_on: false }));
            }
            mailbox.try_push(d).unwrap();
        }
        let taken: Vec<u8> = mailbox.take_shared().iter().map(|d| d.message.payload[0]).collect();
        assert_eq!(taken, [2, 4]);
        assert_eq!(payloads(&mailbox), [1, 3]);
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
        mailbox.set_online();
        mailbox.try_push(delivery(QoS::AtMostOnce, 1)).unwrap();
        assert!(mailbox.try_push(delivery(QoS::AtMostOnce, 2)).is_err());
        assert!(mailbox.try_push(delivery(QoS::AtLeastOnce, 3)).is_err());
    }

    #[tokio::test]
    async fn a_waiting_publisher_gets_in_when_the_reader_drains() {
        let mailbox = Arc::new(Mailbox::new(1));
        mailbox.set_online();
        mailbox.try_push(delivery(QoS::AtLeastOnce, 1)).unwrap();
        let waiter = tokio::spawn({
            let mailbox = mailbox.clone();
            async move { mailbox.push_wait(delivery(QoS::AtLeastOnce, 2), tokio::time::Instant::now() + Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(mailbox.pop().unwrap().message.payload[0], 1);
        assert_eq!(waiter.await.unwrap(), Pushed::Queued(None));
        assert_eq!(payloads(&mailbox), [2]);
    }

    #[tokio::test]
    async fn a_stuck_subscriber_becomes_congested_until_half_drained() {
        let mailbox = Mailbox::new(4);
        mailbox.set_online();
        for n in 0..4 {
            mailbox.try_push(delivery(QoS::AtLeastOnce, n)).unwrap();
        }
        let pushed = mailbox.push_wait(delivery(QoS::AtLeastOnce, 4), tokio::time::Instant::now() + Duration::from_millis(20)).await;
        assert_eq!(pushed, Pushed::QueuedDroppedOldest(None));
        assert_eq!(mailbox.try_push(delivery(QoS::AtMostOnce, 9)).ok(), Some(Pushed::Dropped));
        assert_eq!(mailbox.try_push(delivery(QoS::AtLeastOnce, 5)).ok(), Some(Pushed::QueuedDroppedOldest(None)));
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
