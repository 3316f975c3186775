//! Retained messages: the last retained message of each topic, handed to new subscribers, kept
//! within this node's bounds (`limits.max_retained_messages`, `limits.max_retained_bytes`) and
//! each principal's quota of what it published here (`limits.max_retained_per_client`,
//! `limits.max_retained_bytes_per_client`), so one client cannot fill the store for the others.
//!
//! In a cluster every node keeps every retained message. Each change carries a [`Stamp`] (wall
//! clock milliseconds, then node id) and the latest stamp of a topic wins, whatever order changes
//! arrive in; a cleared topic keeps its stamp as a tombstone (up to [`MAX_TOMBSTONES`]), so a
//! node returning from a partition cannot bring an older message back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::message::Message;
use crate::auth::policy::Owner;
use crate::telemetry::metrics::{self, RetainedLimit};
use crate::topic;

/// How much this node keeps of retained messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Retained messages (one per topic).
    pub max_messages: usize,
    /// Bytes of retained messages, counted as topic + payload.
    pub max_bytes: usize,
    /// Retained messages one principal may have set here (all anonymous clients count as one).
    pub per_owner_messages: usize,
    /// Bytes of them.
    pub per_owner_bytes: usize,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        RetainedLimits {
            max_messages: 1_000_000,
            max_bytes: 1024 * 1024 * 1024,
            per_owner_messages: 10_000,
            per_owner_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What [`RetainedStore::set`] did with a retained message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// Stored for a topic that had no retained message.
    Stored,
    /// Replaced the retained message of its topic (always allowed, even past the byte limit).
    Replaced,
    /// Empty payload: the topic's retained message, if any, is gone.
    Cleared,
    /// A new topic while the store is full: not stored (the message itself is still routed); or
    /// past its publisher's quota: neither stored nor routed (the publisher is told 0x97).
    Refused(RetainedLimit),
    /// Older than what the store has for the topic (a change from another node arriving late).
    Stale,
}

/// When and where a retained message was set or cleared; later stamps win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    pub millis: u64,
    pub node: u64,
}

/// Cleared topics remembered, oldest forgotten first.
pub const MAX_TOMBSTONES: usize = 100_000;

/// One topic of the store, for synchronising another node: its message, or `None` when cleared.
#[derive(Debug, Clone)]
pub struct RetainedEntry {
    pub topic: String,
    pub message: Option<Arc<Message>>,
    pub stamp: Stamp,
}

#[derive(Debug, Default)]
struct Inner {
    messages: HashMap<String, Arc<Message>>,
    /// The stamp of every stored message and of every tombstone.
    stamps: HashMap<String, Stamp>,
    /// Cleared topics, oldest first (their stamps are in `stamps`).
    tombstones: std::collections::VecDeque<(String, Stamp)>,
    /// Sum of [`size`] over `messages`.
    bytes: usize,
    /// No stored message expires before this (it may be earlier than the true earliest expiry:
    /// it is only lowered on insert and recomputed by a purge).
    earliest_expiry: Option<Instant>,
    /// Who set each message published on this node (one merged from another node has none).
    owners: HashMap<String, Owner>,
    /// Messages and bytes each principal has set here.
    usage: HashMap<Owner, (usize, usize)>,
}

impl Inner {
    fn remove(&mut self, topic: &str) -> Option<Arc<Message>> {
        let removed = self.messages.remove(topic)?;
        self.stamps.remove(topic);
        self.bytes -= size(&removed);
        self.disown(topic, size(&removed));
        Some(removed)
    }

    /// Takes a removed message of `bytes` off its owner's usage.
    fn disown(&mut self, topic: &str, bytes: usize) {
        let Some(owner) = self.owners.remove(topic) else { return };
        if let Some((messages, used)) = self.usage.get_mut(&owner) {
            *messages -= 1;
            *used -= bytes;
            if *messages == 0 {
                self.usage.remove(&owner);
            }
        }
    }

    /// Which quota of `owner` storing `message` would break (replacing its own message of the
    /// topic frees that one's share).
    fn over_quota(&self, limits: &RetainedLimits, owner: &Owner, message: &Message) -> Option<RetainedLimit> {
        let (mut messages, mut bytes) = self.usage.get(owner).copied().unwrap_or_default();
        match self.messages.get(&message.topic).filter(|_| self.owners.get(&message.topic) == Some(owner)) {
            Some(own) => bytes -= size(own),
            None => messages += 1,
        }
        if messages > limits.per_owner_messages {
            Some(RetainedLimit::ClientMessages)
        } else if bytes + size(message) > limits.per_owner_bytes {
            Some(RetainedLimit::ClientBytes)
        } else {
            None
        }
    }

    /// Drops expired messages if any may have expired by `now`.
    fn purge_expired(&mut self, now: Instant) {
        if self.earliest_expiry.is_none_or(|at| at > now) {
            return;
        }
        let expired: Vec<String> = self.messages.iter().filter(|(_, m)| m.is_expired(now)).map(|(topic, _)| topic.clone()).collect();
        for topic in expired {
            self.remove(&topic);
        }
        self.earliest_expiry = self.messages.values().filter_map(|m| m.expires_at).min();
    }

    /// Which limit storing `added` more bytes under a new topic would break.
    fn full(&self, limits: &RetainedLimits, added: usize) -> Option<RetainedLimit> {
        if self.messages.len() >= limits.max_messages {
            Some(RetainedLimit::Messages)
        } else if self.bytes.saturating_add(added) > limits.max_bytes {
            Some(RetainedLimit::Bytes)
        } else {
            None
        }
    }
}

/// Bytes a retained message counts for: its topic and payload.
impl Inner {
    /// Whether a change stamped `stamp` is older than what the topic has.
    fn is_stale(&self, topic: &str, stamp: Stamp) -> bool {
        self.stamps.get(topic).is_some_and(|current| *current >= stamp)
    }

    fn clear(&mut self, topic: &str, stamp: Stamp) {
        self.remove(topic);
        self.stamps.insert(topic.to_string(), stamp);
        self.tombstones.push_back((topic.to_string(), stamp));
        while self.tombstones.len() > MAX_TOMBSTONES {
            if let Some((old, old_stamp)) = self.tombstones.pop_front() {
                if self.stamps.get(&old) == Some(&old_stamp) && !self.messages.contains_key(&old) {
                    self.stamps.remove(&old);
                }
            }
        }
    }
}

fn size(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

#[derive(Debug, Default)]
pub struct RetainedStore {
    limits: RetainedLimits,
    inner: RwLock<Inner>,
    /// This node's id in stamps (0 outside a cluster).
    node: AtomicU64,
    /// The last millisecond stamped here, so this node's stamps always increase.
    last_millis: AtomicU64,
}

impl RetainedStore {
    pub fn new(limits: RetainedLimits) -> RetainedStore {
        RetainedStore { limits, ..RetainedStore::default() }
    }

    /// The node id this store's stamps carry.
    pub fn set_node(&self, node: u64) {
        self.node.store(node, Ordering::Relaxed);
    }

    /// A stamp for a change made here now.
    fn next_stamp(&self) -> Stamp {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut last = self.last_millis.load(Ordering::Relaxed);
        loop {
            let millis = now.max(last + 1);
            match self.last_millis.compare_exchange_weak(last, millis, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Stamp { millis, node: self.node.load(Ordering::Relaxed) },
                Err(actual) => last = actual,
            }
        }
    }

    /// Stores (or clears) a retained message published on this node by `owner` (`None`: the
    /// broker itself); returns what happened and the stamp it got.
    pub fn set_local(&self, message: Arc<Message>, owner: Option<&Owner>) -> (SetOutcome, Stamp) {
        let stamp = self.next_stamp();
        (self.set(message, stamp, owner), stamp)
    }

    /// Everything the store holds, tombstones included, for another node to merge.
    pub fn entries(&self) -> Vec<RetainedEntry> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        (inner.stamps.iter())
            .map(|(topic, stamp)| RetainedEntry { topic: topic.clone(), message: inner.messages.get(topic).cloned(), stamp: *stamp })
            .collect()
    }

    /// Applies a topic's state from another node, if it is newer than ours.
    pub fn merge(&self, entry: RetainedEntry) -> SetOutcome {
        match entry.message {
            Some(message) => self.set(message, entry.stamp, None),
            None => {
                let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
                if inner.is_stale(&entry.topic, entry.stamp) {
                    return SetOutcome::Stale;
                }
                inner.clear(&entry.topic, entry.stamp);
                SetOutcome::Cleared
            }
        }
    }

    /// Stores `message` as the retained message of its topic, set by `owner`; an empty payload
    /// clears it. Clearing always works, and so does replacing within the owner's quota; a new
    /// topic is refused when the store is full (after expired messages are dropped); refusals are
    /// counted in `rampart_retained_refused_total`.
    fn set(&self, message: Arc<Message>, stamp: Stamp, owner: Option<&Owner>) -> SetOutcome {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.is_stale(&message.topic, stamp) {
            return SetOutcome::Stale;
        }
        if message.payload.is_empty() {
            inner.clear(&message.topic, stamp);
            return SetOutcome::Cleared;
        }
        if let Some(owner) = owner {
            if inner.over_quota(&self.limits, owner, &message).is_some() {
                inner.purge_expired(Instant::now());
            }
            if let Some(limit) = inner.over_quota(&self.limits, owner, &message) {
                drop(inner);
                metrics::retained_refused(limit);
                tracing::debug!(topic = %message.topic, %owner, ?limit, "retained quota of the publisher reached; message refused");
                return SetOutcome::Refused(limit);
            }
        }
        let added = size(&message);
        let outcome = if inner.remove(&message.topic).is_some() {
            SetOutcome::Replaced
        } else {
            if inner.full(&self.limits, added).is_some() {
                inner.purge_expired(Instant::now());
            }
            if let Some(limit) = inner.full(&self.limits, added) {
                drop(inner);
                metrics::retained_refused(limit);
                tracing::debug!(topic = %message.topic, ?limit, "retained store full; retained message not stored");
                return SetOutcome::Refused(limit);
            }
            SetOutcome::Stored
        };
        if let Some(at) = message.expires_at {
            inner.earliest_expiry = Some(inner.earliest_expiry.map_or(at, |e| e.min(at)));
        }
        inner.bytes += added;
        inner.stamps.insert(message.topic.clone(), stamp);
        if let Some(owner) = owner {
            let usage = inner.usage.entry(owner.clone()).or_default();
            (usage.0, usage.1) = (usage.0 + 1, usage.1 + added);
            inner.owners.insert(message.topic.clone(), owner.clone());
        }
        inner.messages.insert(message.topic.clone(), message);
        outcome
    }

    /// Retained messages whose topic matches `filter`, expired ones removed.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = Instant::now();
        let (live, expired): (Vec<_>, Vec<_>) = {
            let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
            inner.messages.values().filter(|m| topic::matches(filter, &m.topic)).cloned().partition(|m| !m.is_expired(now))
        };
        if !expired.is_empty() {
            let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
            for m in expired {
                if inner.messages.get(&m.topic).is_some_and(|current| Arc::ptr_eq(current, &m)) {
                    inner.remove(&m.topic);
                }
            }
        }
        live
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the stored retained messages (topic + payload), for the `rampart_retained_bytes` gauge.
    pub fn bytes(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqttbytes::QoS;
    use std::time::Duration;

    fn msg(topic: &str, payload: &'static [u8], expires_at: Option<Instant>) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at,
            publisher: None,
            id: None,
        })
    }

    fn bounded(max_messages: usize, max_bytes: usize) -> RetainedStore {
        RetainedStore::new(RetainedLimits { max_messages, max_bytes, ..RetainedLimits::default() })
    }

    fn entry(topic: &str, payload: &'static [u8], millis: u64, node: u64) -> RetainedEntry {
        let message = (!payload.is_empty()).then(|| msg(topic, payload, None));
        RetainedEntry { topic: topic.into(), message, stamp: Stamp { millis, node } }
    }

    #[test]
    fn the_latest_stamp_wins_whatever_the_order() {
        let (a, b) = (RetainedStore::default(), RetainedStore::default());
        let changes = [entry("t", b"1", 10, 1), entry("t", b"2", 20, 2), entry("t", b"", 30, 1), entry("u", b"x", 5, 3)];
        for e in changes.iter().cloned() {
            a.merge(e);
        }
        for e in changes.iter().rev().cloned() {
            b.merge(e);
        }
        for store in [&a, &b] {
            assert!(store.matching("t").is_empty(), "the clear at 30 wins and stays as a tombstone");
            assert_eq!(store.matching("u").len(), 1);
        }
        assert_eq!(a.merge(entry("t", b"old", 25, 9)), SetOutcome::Stale);
        assert_eq!(a.merge(entry("t", b"new", 31, 0)), SetOutcome::Stored);
        let mut synced: Vec<(String, bool, Stamp)> = a.entries().into_iter().map(|e| (e.topic, e.message.is_some(), e.stamp)).collect();
        synced.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(synced, [("t".into(), true, Stamp { millis: 31, node: 0 }), ("u".into(), true, Stamp { millis: 5, node: 3 })]);
    }

    #[test]
    fn local_stamps_always_increase() {
        let store = RetainedStore::default();
        store.set_node(7);
        let stamps: Vec<Stamp> = (0..100).map(|i| store.set_local(msg("t", if i % 2 == 0 { b"x" } else { b"" }, None), None).1).collect();
        assert!(stamps.windows(2).all(|w| w[0] < w[1] && w[1].node == 7));
    }

    #[test]
    fn store_replace_clear() {
        let store = RetainedStore::default();
        assert_eq!(store.set_local(msg("a/b", b"1", None), None).0, SetOutcome::Stored);
        assert_eq!(store.set_local(msg("a/b", b"2", None), None).0, SetOutcome::Replaced);
        store.set_local(msg("a/c", b"3", None), None);
        assert_eq!(store.len(), 2);
        let got = store.matching("a/b");
        assert_eq!(got[0].payload, Bytes::from_static(b"2"));
        assert_eq!(store.matching("a/+").len(), 2);
        assert_eq!(store.set_local(msg("a/b", b"", None), None).0, SetOutcome::Cleared);
        assert_eq!(store.matching("#").len(), 1);
    }

    #[test]
    fn expired_messages_are_not_delivered() {
        let store = RetainedStore::default();
        store.set_local(msg("x", b"old", Some(Instant::now() - Duration::from_secs(1))), None);
        assert!(store.matching("x").is_empty());
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn dollar_topics_need_explicit_filters() {
        let store = RetainedStore::default();
        store.set_local(msg("$SYS/uptime", b"1", None), None);
        assert!(store.matching("#").is_empty());
        assert_eq!(store.matching("$SYS/#").len(), 1);
    }

    #[test]
    fn bytes_count_topic_and_payload_through_replace_clear_and_expiry() {
        let store = RetainedStore::default();
        store.set_local(msg("a/b", b"12345", None), None);
        assert_eq!(store.bytes(), 3 + 5);
        store.set_local(msg("a/b", b"1", None), None);
        assert_eq!(store.bytes(), 3 + 1);
        store.set_local(msg("c", b"xy", Some(Instant::now() - Duration::from_secs(1))), None);
        assert_eq!(store.bytes(), 4 + 3);
        assert!(store.matching("c").is_empty());
        assert_eq!(store.bytes(), 4);
        store.set_local(msg("a/b", b"", None), None);
        store.set_local(msg("never/stored", b"", None), None);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn a_new_topic_past_the_message_limit_is_refused_and_replacing_still_works() {
        let store = bounded(2, 1000);
        store.set_local(msg("a", b"1", None), None);
        store.set_local(msg("b", b"1", None), None);
        assert_eq!(store.set_local(msg("c", b"1", None), None).0, SetOutcome::Refused(RetainedLimit::Messages));
        assert!(store.matching("c").is_empty());
        assert_eq!(store.len(), 2);
        assert_eq!(store.set_local(msg("a", b"2", None), None).0, SetOutcome::Replaced);
        assert_eq!(store.matching("a")[0].payload, Bytes::from_static(b"2"));
        assert_eq!(store.set_local(msg("b", b"", None), None).0, SetOutcome::Cleared);
        assert_eq!(store.set_local(msg("c", b"1", None), None).0, SetOutcome::Stored);
    }

    #[test]
    fn a_new_topic_past_the_byte_limit_is_refused_and_a_bigger_replacement_still_works() {
        let store = bounded(100, 10);
        assert_eq!(store.set_local(msg("a", b"1234", None), None).0, SetOutcome::Stored); // 5 bytes
        assert_eq!(store.set_local(msg("b", b"1234", None), None).0, SetOutcome::Stored); // 10 bytes: exactly full
        assert_eq!(store.set_local(msg("c", b"", None), None).0, SetOutcome::Cleared);
        assert_eq!(store.set_local(msg("c", b"1", None), None).0, SetOutcome::Refused(RetainedLimit::Bytes));
        assert_eq!(store.set_local(msg("a", b"123456789", None), None).0, SetOutcome::Replaced);
        assert_eq!(store.bytes(), 15);
        assert_eq!(store.set_local(msg("a", b"", None), None).0, SetOutcome::Cleared);
        assert_eq!(store.bytes(), 5);
        assert_eq!(store.set_local(msg("c", b"1234", None), None).0, SetOutcome::Stored);
    }

    #[test]
    fn a_full_store_drops_expired_messages_before_refusing() {
        let store = bounded(2, 1000);
        let past = Instant::now() - Duration::from_secs(1);
        let future = Instant::now() + Duration::from_secs(3600);
        store.set_local(msg("gone", b"1", Some(past)), None);
        store.set_local(msg("later", b"1", Some(future)), None);
        assert_eq!(store.set_local(msg("new", b"1", None), None).0, SetOutcome::Stored);
        assert_eq!(store.len(), 2);
        assert_eq!(store.bytes(), 6 + 4);
        assert_eq!(store.set_local(msg("next", b"1", None), None).0, SetOutcome::Refused(RetainedLimit::Messages));
    }

    #[test]
    fn each_publisher_keeps_to_its_own_quota_and_leaves_room_for_the_others() {
        let store = RetainedStore::new(RetainedLimits { per_owner_messages: 2, per_owner_bytes: 12, ..RetainedLimits::default() });
        let (greedy, other) = (Owner::Password { username: "greedy".into() }, Owner::Anonymous);
        assert_eq!(store.set_local(msg("g/1", b"1", None), Some(&greedy)).0, SetOutcome::Stored);
        assert_eq!(store.set_local(msg("g/2", b"1", None), Some(&greedy)).0, SetOutcome::Stored);
        assert_eq!(store.set_local(msg("g/3", b"1", None), Some(&greedy)).0, SetOutcome::Refused(RetainedLimit::ClientMessages));
        assert_eq!(store.set_local(msg("g/2", b"12345", None), Some(&greedy)).0, SetOutcome::Replaced, "its own topic: within quota");
        assert_eq!(store.set_local(msg("g/1", b"123456", None), Some(&greedy)).0, SetOutcome::Refused(RetainedLimit::ClientBytes));
        assert_eq!(store.set_local(msg("o/1", b"1", None), Some(&other)).0, SetOutcome::Stored, "the others are not affected");
        // Another principal replacing one of its topics takes it over; a clear frees it.
        assert_eq!(store.set_local(msg("g/1", b"1", None), Some(&other)).0, SetOutcome::Replaced);
        assert_eq!(store.set_local(msg("g/2", b"", None), Some(&greedy)).0, SetOutcome::Cleared);
        assert_eq!(store.set_local(msg("g/3", b"1", None), Some(&greedy)).0, SetOutcome::Stored);
        assert_eq!(store.set_local(msg("g/4", b"1", None), Some(&greedy)).0, SetOutcome::Stored);
        assert_eq!(store.set_local(msg("g/5", b"1", None), None).0, SetOutcome::Stored, "the broker's own messages count for nobody");
    }
}
