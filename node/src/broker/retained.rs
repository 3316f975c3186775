//! Retained messages: the last retained message of each topic, handed to new subscribers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::message::Message;
use crate::topic;

#[derive(Debug, Default)]
pub struct RetainedStore {
    messages: RwLock<HashMap<String, Arc<Message>>>,
}

impl RetainedStore {
    /// Stores `message` as the retained message of its topic; an empty payload clears it.
    pub fn set(&self, message: Arc<Message>) {
        let mut map = self.messages.write().unwrap_or_else(|p| p.into_inner());
        if message.payload.is_empty() {
            map.remove(&message.topic);
        } else {
            map.insert(message.topic.clone(), message);
        }
    }

    /// Retained messages whose topic matches `filter`, expired ones removed.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = Instant::now();
        let (live, expired): (Vec<_>, Vec<_>) = {
            let map = self.messages.read().unwrap_or_else(|p| p.into_inner());
            map.values().filter(|m| topic::matches(filter, &m.topic)).cloned().partition(|m| !m.is_expired(now))
        };
        if !expired.is_empty() {
            let mut map = self.messages.write().unwrap_or_else(|p| p.into_inner());
            for m in expired {
                if map.get(&m.topic).is_some_and(|current| Arc::ptr_eq(current, &m)) {
                    map.remove(&m.topic);
                }
            }
        }
        live
    }

    pub fn len(&self) -> usize {
        self.messages.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    #[test]
    fn store_replace_clear() {
        let store = RetainedStore::default();
        store.set(msg("a/b", b"1", None));
        store.set(msg("a/b", b"2", None));
        store.set(msg("a/c", b"3", None));
        assert_eq!(store.len(), 2);
        let got = store.matching("a/b");
        assert_eq!(got[0].payload, Bytes::from_static(b"2"));
        assert_eq!(store.matching("a/+").len(), 2);
        store.set(msg("a/b", b"", None));
        assert_eq!(store.matching("#").len(), 1);
    }

    #[test]
    fn expired_messages_are_not_delivered() {
        let store = RetainedStore::default();
        store.set(msg("x", b"old", Some(Instant::now() - Duration::from_secs(1))));
        assert!(store.matching("x").is_empty());
        assert!(store.is_empty());
    }

    #[test]
    fn dollar_topics_need_explicit_filters() {
        let store = RetainedStore::default();
        store.set(msg("$SYS/uptime", b"1", None));
        assert!(store.matching("#").is_empty());
        assert_eq!(store.matching("$SYS/#").len(), 1);
    }
}
