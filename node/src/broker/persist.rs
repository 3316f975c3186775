//! Durable sessions of APPLICATION clients: their subscriptions, unacknowledged and queued
//! messages, kept in sled so they survive a broker restart. Written when such a session goes
//! offline and again at shutdown; removed when the session ends. DEVICE sessions stay in memory.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqttbytes::v5::PublishProperties;
use mqttbytes::QoS;
use serde::{Deserialize, Serialize};

use super::index::SubscriptionOptions;
use super::message::{Delivery, Message};
use super::registry::{Inflight, SessionRecord};

/// A session as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSession {
    pub expiry_secs: u64,
    /// When the offline session expires, seconds since the Unix epoch.
    pub expires_at: u64,
    pub subscriptions: Vec<(String, StoredOptions)>,
    /// Unacknowledged messages first, then the queue, in delivery order.
    pub messages: Vec<StoredMessage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub message_qos: u8,
    pub delivery_qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<usize>,
    pub expires_at: Option<u64>,
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

fn qos(n: u8) -> QoS {
    match n {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `Instant` → seconds since the Unix epoch (for times within the process lifetime).
fn to_unix(at: Instant) -> u64 {
    unix_now() + at.saturating_duration_since(Instant::now()).as_secs()
}

fn from_unix(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs.saturating_sub(unix_now()))
}

impl StoredMessage {
    fn from_delivery(d: &Delivery) -> StoredMessage {
        let m = &d.message;
        let p = m.properties.as_ref();
        StoredMessage {
            topic: m.topic.clone(),
            payload: m.payload.to_vec(),
            message_qos: m.qos as u8,
            delivery_qos: d.qos as u8,
            retain: d.retain,
            subscription_ids: d.subscription_ids.clone(),
            expires_at: m.expires_at.map(to_unix),
            payload_format_indicator: p.and_then(|p| p.payload_format_indicator),
            content_type: p.and_then(|p| p.content_type.clone()),
            response_topic: p.and_then(|p| p.response_topic.clone()),
            correlation_data: p.and_then(|p| p.correlation_data.as_ref().map(|c| c.to_vec())),
            user_properties: p.map(|p| p.user_properties.clone()).unwrap_or_default(),
        }
    }

    fn into_delivery(self) -> Delivery {
        let has_properties = self.payload_format_indicator.is_some()
            || self.content_type.is_some()
            || self.response_topic.is_some()
            || self.correlation_data.is_some()
            || !self.user_properties.is_empty();
        let properties = has_properties.then(|| PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: self.response_topic,
            correlation_data: self.correlation_data.map(Bytes::from),
            user_properties: self.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: self.content_type,
        });
        let message = Message {
            topic: self.topic,
            payload: Bytes::from(self.payload),
            qos: qos(self.message_qos),
            retain: self.retain,
            properties,
            expires_at: self.expires_at.map(from_unix),
            publisher: None,
        };
        Delivery { message: Arc::new(message), qos: qos(self.delivery_qos), retain: self.retain, subscription_ids: self.subscription_ids }
    }
}

impl StoredSession {
    /// A snapshot of an offline session: in-flight messages (oldest first) ahead of the queue.
    pub fn capture(record: &SessionRecord) -> StoredSession {
        let mut inflight: Vec<(u64, &Delivery)> = record
            .inflight
            .values()
            .filter_map(|(seq, f)| match f {
                Inflight::Publish(d) => Some((*seq, d)),
                Inflight::Released => None,
            })
            .collect();
        inflight.sort_by_key(|(seq, _)| *seq);
        let queued = record.mailbox.snapshot();
        StoredSession {
            expiry_secs: record.expiry.as_secs(),
            expires_at: record.expires_at.map_or_else(|| unix_now() + record.expiry.as_secs(), to_unix),
            subscriptions: record
                .subscriptions
                .iter()
                .map(|(filter, o)| {
                    let options = StoredOptions {
                        qos: o.qos as u8,
                        no_local: o.no_local,
                        retain_as_published: o.retain_as_published,
                        subscription_id: o.subscription_id,
                    };
                    (filter.clone(), options)
                })
                .collect(),
            messages: inflight.into_iter().map(|(_, d)| d).chain(queued.iter()).map(StoredMessage::from_delivery).collect(),
        }
    }

    /// The subscriptions with their options.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&str, SubscriptionOptions)> {
        self.subscriptions.iter().map(|(f, o)| {
            let options = SubscriptionOptions {
                qos: qos(o.qos),
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                subscription_id: o.subscription_id,
            };
            (f.as_str(), options)
        })
    }

    pub fn expiry(&self) -> Duration {
        Duration::from_secs(self.expiry_secs)
    }

    pub fn expires_at(&self) -> Instant {
        from_unix(self.expires_at)
    }

    pub fn into_deliveries(self) -> impl Iterator<Item = Delivery> {
        self.messages.into_iter().map(StoredMessage::into_delivery)
    }
}

/// The sled database of durable sessions.
pub struct SessionStore {
    db: sled::Db,
    sessions: sled::Tree,
}

impl SessionStore {
    pub fn open(dir: &Path) -> anyhow::Result<SessionStore> {
        let db = sled::Config::new()
            .path(dir.join("sessions"))
            .cache_capacity(32 << 20)
            .open()
            .map_err(|e| anyhow::anyhow!("opening the session store in {}: {e}", dir.display()))?;
        let sessions = db.open_tree("sessions")?;
        Ok(SessionStore { db, sessions })
    }

    pub fn save(&self, client_id: &str, session: &StoredSession) -> anyhow::Result<()> {
        self.sessions.insert(client_id.as_bytes(), serde_json::to_vec(session)?)?;
        Ok(())
    }

    pub fn remove(&self, client_id: &str) -> anyhow::Result<()> {
        self.sessions.remove(client_id.as_bytes())?;
        Ok(())
    }

    /// Every stored session; unreadable entries are reported and skipped.
    pub fn load(&self) -> Vec<(String, StoredSession)> {
        self.sessions
            .iter()
            .filter_map(|entry| {
                let (key, value) = entry.map_err(|e| tracing::error!(error = %e, "session store read failed")).ok()?;
                let client_id = String::from_utf8_lossy(&key).into_owned();
                match serde_json::from_slice(&value) {
                    Ok(session) => Some((client_id, session)),
                    Err(e) => {
                        tracing::error!(%client_id, error = %e, "stored session unreadable; skipped");
                        None
                    }
                }
            })
            .collect()
    }

    /// Writes everything to disk (fsync).
    pub fn flush(&self) -> anyhow::Result<()> {
        self.db.flush()?;
        Ok(())
    }
}
