//! Retained messages: the last retained message of each topic, handed to new subscribers, kept
//! within this node's bounds (`limits.max_retained_messages`, `limits.max_retained_bytes`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::message::Message;
use crate::telemetry::metrics::{self, RetainedLimit};
use crate::topic;

/// How much this node keeps of retained messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Retained messages (one per topic).
    pub max_messages: usize,
    /// Bytes of retained messages, counted as topic + payload.
    pub max_bytes: usize,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        RetainedLimits { max_messages: 1_000_000, max_bytes: 1024 * 1024 * 1024 }
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
    /// A new topic while the store is full: not stored (the message itself is still routed).
    Refused(RetainedLimit),
}

#[derive(Debug, Default)]
struct Inner {
    messages: HashMap<String, Arc<Message>>,
    /// Sum of [`size`] over `messages`.
    bytes: usize,
    /// No stored message expires before this (it may be earlier than the true earliest expiry:
    /// it is only lowered on insert and recomputed by a purge).
    earliest_expiry: Option<Instant>,
}

impl Inner {
    fn remove(&mut self, topic: &str) -> Option<Arc<Message>> {
        let removed = self.messages.remove(topic)?;
        self.bytes -= size(&removed);
        Some(removed)
    }

    /// Drops expired messages if any may have expired by `now`.
    fn purge_expired(&mut self, now: Instant) {
        if self.earliest_expiry.is_none_or(|at| at > now) {
            return;
        }
        let mut freed = 0;
        self.messages.retain(|_, m| {
            let keep = !m.is_expired(now);
            if !keep {
                freed += size(m);
            }
            keep
        });
        self.bytes -= freed;
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
fn size(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

#[derive(Debug, Default)]
pub struct RetainedStore {
    limits: RetainedLimits,
    inner: RwLock<Inner>,
}

impl RetainedStore {
    pub fn new(limits: RetainedLimits) -> RetainedStore {
        RetainedStore { limits, inner: RwLock::default() }
    }

    /// Stores `message` as the retained message of its topic; an empty payload clears it.
    /// Replacing or clearing always works; a new topic is refused when the store is full (after
    /// expired messages are dropped), counted in `rampart_retained_refused_total`.
    pub fn set(&self, message: Arc<Message>) -> SetOutcome {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if message.payload.is_empty() {
            inner.remove(&message.topic);
            return SetOutcome::Cleared;
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
        })
    }

    fn bounded(max_messages: usize, max_bytes: usize) -> RetainedStore {
        RetainedStore::new(RetainedLimits { max_messages, max_bytes })
    }

    #[test]
    fn store_replace_clear() {
        let store = RetainedStore::default();
        assert_eq!(store.set(msg("a/b", b"1", None)), SetOutcome::Stored);
        assert_eq!(store.set(msg("a/b", b"2", None)), SetOutcome::Replaced);
        store.set(msg("a/c", b"3", None));
        assert_eq!(store.len(), 2);
        let got = store.matching("a/b");
        assert_eq!(got[0].payload, Bytes::from_static(b"2"));
        assert_eq!(store.matching("a/+").len(), 2);
        assert_eq!(store.set(msg("a/b", b"", None)), SetOutcome::Cleared);
        assert_eq!(store.matching("#").len(), 1);
    }

    #[test]
    fn expired_messages_are_not_delivered() {
        let store = RetainedStore::default();
        store.set(msg("x", b"old", Some(Instant::now() - Duration::from_secs(1))));
        assert!(store.matching("x").is_empty());
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn dollar_topics_need_explicit_filters() {
        let store = RetainedStore::default();
        store.set(msg("$SYS/uptime", b"1", None));
        assert!(store.matching("#").is_empty());
        assert_eq!(store.matching("$SYS/#").len(), 1);
    }

    #[test]
    fn bytes_count_topic_and_payload_through_replace_clear_and_expiry() {
        let store = RetainedStore::default();
        store.set(msg("a/b", b"12345", None));
        assert_eq!(store.bytes(), 3 + 5);
        store.set(msg("a/b", b"1", None));
        assert_eq!(store.bytes(), 3 + 1);
        store.set(msg("c", b"xy", Some(Instant::now() - Duration::from_secs(1))));
        assert_eq!(store.bytes(), 4 + 3);
        assert!(store.matching("c").is_empty());
        assert_eq!(store.bytes(), 4);
        store.set(msg("a/b", b"", None));
        store.set(msg("never/stored", b"", None));
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn a_new_topic_past_the_message_limit_is_refused_and_replacing_still_works() {
        let store = bounded(2, 1000);
        store.set(msg("a", b"1", None));
        store.set(msg("b", b"1", None));
        assert_eq!(store.set(msg("c", b"1", None)), SetOutcome::Refused(RetainedLimit::Messages));
        assert!(store.matching("c").is_empty());
        assert_eq!(store.len(), 2);
        assert_eq!(store.set(msg("a", b"2", None)), SetOutcome::Replaced);
        assert_eq!(store.matching("a")[0].payload, Bytes::from_static(b"2"));
        assert_eq!(store.set(msg("b", b"", None)), SetOutcome::Cleared);
        assert_eq!(store.set(msg("c", b"1", None)), SetOutcome::Stored);
    }

    #[test]
    fn a_new_topic_past_the_byte_limit_is_refused_and_a_bigger_replacement_still_works() {
        let store = bounded(100, 10);
        assert_eq!(store.set(msg("a", b"1234", None)), SetOutcome::Stored); // 5 bytes
        assert_eq!(store.set(msg("b", b"1234", None)), SetOutcome::Stored); // 10 bytes: exactly full
        assert_eq!(store.set(msg("c", b"", None)), SetOutcome::Cleared);
        assert_eq!(store.set(msg("c", b"1", None)), SetOutcome::Refused(RetainedLimit::Bytes));
        assert_eq!(store.set(msg("a", b"123456789", None)), SetOutcome::Replaced);
        assert_eq!(store.bytes(), 15);
        assert_eq!(store.set(msg("a", b"", None)), SetOutcome::Cleared);
        assert_eq!(store.bytes(), 5);
        assert_eq!(store.set(msg("c", b"1234", None)), SetOutcome::Stored);
    }

    #[test]
    fn a_full_store_drops_expired_messages_before_refusing() {
        let store = bounded(2, 1000);
        let past = Instant::now() - Duration::from_secs(1);
        let future = Instant::now() + Duration::from_secs(3600);
        store.set(msg("gone", b"1", Some(past)));
        store.set(msg("later", b"1", Some(future)));
        assert_eq!(store.set(msg("new", b"1", None)), SetOutcome::Stored);
        assert_eq!(store.len(), 2);
        assert_eq!(store.bytes(), 6 + 4);
        assert_eq!(store.set(msg("next", b"1", None)), SetOutcome::Refused(RetainedLimit::Messages));
    }
}
