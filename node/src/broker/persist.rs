//! Durable sessions of APPLICATION clients in sled, written with group commit.
//!
//! What is stored: an offline durable session (owner, expiry, subscriptions, messages in flight
//! with their QoS 2 state, packet ids awaiting PUBREL) under its client id, and each message
//! queued for it under the client id and a sequence number. A session is saved when it goes
//! offline; every message queued for it while it is offline is appended; the stored copy is
//! removed when its client resumes it (and saved again when it leaves) or when it ends.
//!
//! Writes are submitted from any thread as [`StoreOp`]s and applied in order by one writer
//! thread, which fsyncs once per batch and then publishes the highest durable ticket. A
//! publisher acknowledges a QoS 1/2 message only after [`StoreHandle::durable`] has passed the
//! ticket of the writes its message caused, so nothing acknowledged is lost to `kill -9`.
//! Records are encoded compactly with postcard.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttbytes::v5::PublishProperties;
use mqttbytes::QoS;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::index::SubscriptionOptions;
use super::message::{Delivery, Message, MessageId};
use super::state::{Inflight, SessionState};
use crate::auth::policy::Owner;
use crate::clock::{from_unix, to_unix};

/// A stored session without its queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSession {
    pub owner: Owner,
    pub expiry_secs: u64,
    /// When the offline session expires, seconds since the Unix epoch.
    pub expires_at: u64,
    pub subscriptions: Vec<(String, StoredOptions)>,
    /// Messages sent and not yet acknowledged, in the order they were sent.
    pub inflight: Vec<StoredInflight>,
    /// Incoming QoS 2 packet ids that got PUBREC and wait for PUBREL.
    pub awaiting_pubrel: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<usize>,
}

/// One outgoing message in flight: a PUBLISH awaiting its acknowledgement (`message` set) or
/// a PUBREL awaiting PUBCOMP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredInflight {
    pub packet_id: u16,
    pub sequence: u64,
    pub message: Option<StoredMessage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMessage {
    pub topic: String,
    /// Serialized as one byte string (the same bytes postcard writes for a `Vec<u8>`).
    pub payload: Bytes,
    pub message_qos: u8,
    pub delivery_qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<usize>,
    pub expires_at: Option<u64>,
    pub properties: StoredProperties,
}

/// The MQTT 5 properties a message carries to its subscribers, as stored and sent between nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProperties {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

impl StoredProperties {
    pub fn capture(p: Option<&PublishProperties>) -> StoredProperties {
        StoredProperties {
            payload_format_indicator: p.and_then(|p| p.payload_format_indicator),
            content_type: p.and_then(|p| p.content_type.clone()),
            response_topic: p.and_then(|p| p.response_topic.clone()),
            correlation_data: p.and_then(|p| p.correlation_data.as_ref().map(|c| c.to_vec())),
            user_properties: p.map(|p| p.user_properties.clone()).unwrap_or_default(),
        }
    }

    /// The properties again; `None` when there are none.
    pub fn into_properties(self) -> Option<PublishProperties> {
        (self != StoredProperties::default()).then(|| PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: self.response_topic,
            correlation_data: self.correlation_data.map(Bytes::from),
            user_properties: self.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: self.content_type,
        })
    }

    /// About how many bytes they take serialized.
    pub fn wire_size(&self) -> usize {
        let strings = [&self.content_type, &self.response_topic].iter().map(|s| s.as_ref().map_or(1, |s| s.len() + 2)).sum::<usize>();
        let user: usize = self.user_properties.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        strings + self.correlation_data.as_ref().map_or(1, |c| c.len() + 2) + user + 4
    }
}

fn qos(n: u8) -> QoS {
    match n {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

impl StoredMessage {
    /// About how many bytes it takes serialized.
    pub fn wire_size(&self) -> usize {
        self.topic.len() + self.payload.len() + self.properties.wire_size() + self.subscription_ids.len() * 4 + 24
    }

    pub fn from_delivery(d: &Delivery) -> StoredMessage {
        let m = &d.message;
        StoredMessage {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            message_qos: m.qos as u8,
            delivery_qos: d.qos as u8,
            retain: d.retain,
            subscription_ids: d.subscription_ids.clone(),
            expires_at: m.expires_at.map(to_unix),
            properties: StoredProperties::capture(m.properties.as_ref()),
        }
    }

    pub fn into_delivery(self) -> Delivery {
        self.into_delivery_with(None)
    }

    fn into_delivery_with(self, id: Option<MessageId>) -> Delivery {
        let message = Message {
            topic: self.topic,
            payload: self.payload,
            qos: qos(self.message_qos),
            retain: self.retain,
            properties: self.properties.into_properties(),
            expires_at: self.expires_at.map(from_unix),
            publisher: None,
            id,
        };
        Delivery {
            message: Arc::new(message),
            qos: qos(self.delivery_qos),
            retain: self.retain,
            subscription_ids: self.subscription_ids,
            shared: None,
        }
    }
}

impl StoredSession {
    /// The stored form of a session going offline now.
    pub fn capture(state: &SessionState, expires_at: Instant) -> StoredSession {
        let mut inflight: Vec<StoredInflight> = (state.inflight.iter())
            .map(|(&packet_id, (sequence, f))| StoredInflight {
                packet_id,
                sequence: *sequence,
                message: match f {
                    Inflight::Publish(d) => Some(StoredMessage::from_delivery(d)),
                    Inflight::Released => None,
                },
            })
            .collect();
        inflight.sort_by_key(|f| f.sequence);
        let mut awaiting_pubrel: Vec<u16> = state.awaiting_pubrel.iter().copied().collect();
        awaiting_pubrel.sort_unstable();
        StoredSession {
            owner: state.owner.clone(),
            expiry_secs: state.expiry.as_secs(),
            expires_at: to_unix(expires_at),
            subscriptions: (state.subscriptions.iter())
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
            inflight,
            awaiting_pubrel,
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

    /// The messages in flight as the session keeps them.
    pub fn take_inflight(&mut self) -> impl Iterator<Item = (u16, u64, Inflight)> {
        std::mem::take(&mut self.inflight).into_iter().map(|f| {
            let entry = f.message.map_or(Inflight::Released, |m| Inflight::Publish(m.into_delivery()));
            (f.packet_id, f.sequence, entry)
        })
    }
}

/// A session handed from one node to another when its client reconnects elsewhere: its state
/// and its queued messages, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedSession {
    pub session: StoredSession,
    pub queued: Vec<MovedMessage>,
}

/// A queued message leaving with its session for another node, with its cluster identity (so the
/// new node does not deliver it twice when it also reaches the session directly).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedMessage {
    pub id: Option<MessageId>,
    pub message: StoredMessage,
}

impl MovedMessage {
    pub fn from_delivery(d: &Delivery) -> MovedMessage {
        MovedMessage { id: d.message.id, message: StoredMessage::from_delivery(d) }
    }

    pub fn into_delivery(self) -> Delivery {
        self.message.into_delivery_with(self.id)
    }
}

/// A session read back from the store: its state and its queue in order (sequence, message).
pub struct LoadedSession {
    pub client_id: String,
    pub session: StoredSession,
    pub queued: Vec<(u64, Delivery)>,
}

/// One write to the store.
#[derive(Debug)]
pub enum StoreOp {
    /// A session went offline: its state and its queue replace whatever was stored.
    Save { client_id: Arc<str>, session: Box<StoredSession>, queued: Vec<(u64, StoredMessage)> },
    /// A message was queued for an offline session.
    Enqueue { client_id: Arc<str>, sequence: u64, message: Box<StoredMessage> },
    /// A queued message was dropped (queue overflow).
    Dequeue { client_id: Arc<str>, sequence: u64 },
    /// The session was resumed or ended: its stored copy goes.
    Remove { client_id: Arc<str> },
}

/// Largest number of writes applied under one fsync.
const MAX_BATCH: usize = 8192;

struct Submitter {
    next_ticket: u64,
    tx: mpsc::Sender<(u64, StoreOp)>,
}

/// Submits writes to the store's writer thread and tells when they are durable. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    submitter: Arc<Mutex<Submitter>>,
    durable: watch::Receiver<u64>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").field("durable", &*self.durable.borrow()).finish()
    }
}

impl StoreHandle {
    /// Queues a write; returns its ticket (durable once [`StoreHandle::durable`] reaches it).
    pub fn submit(&self, op: StoreOp) -> u64 {
        let mut submitter = self.submitter.lock().unwrap_or_else(|p| p.into_inner());
        submitter.next_ticket += 1;
        let ticket = submitter.next_ticket;
        if submitter.tx.send((ticket, op)).is_err() {
            tracing::error!("session store writer stopped; write lost");
        }
        ticket
    }

    /// Waits until every write up to `ticket` is on disk.
    pub async fn durable(&self, ticket: u64) {
        let mut durable = self.durable.clone();
        let _ = durable.wait_for(|&done| done >= ticket).await;
    }

    /// Waits until everything submitted so far is on disk.
    pub async fn sync(&self) {
        let last = self.submitter.lock().unwrap_or_else(|p| p.into_inner()).next_ticket;
        self.durable(last).await;
    }
}

/// The sled database of durable sessions and its writer thread.
pub struct SessionStore {
    sessions: sled::Tree,
    queue: sled::Tree,
    handle: StoreHandle,
}

fn queue_prefix(client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(client_id.len() + 9);
    key.extend_from_slice(client_id.as_bytes());
    key.push(0);
    key
}

fn queue_key(client_id: &str, sequence: u64) -> Vec<u8> {
    let mut key = queue_prefix(client_id);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("stored records always encode")
}

impl SessionStore {
    pub fn open(dir: &Path) -> anyhow::Result<SessionStore> {
        let db = sled::Config::new()
            .path(dir.join("sessions"))
            .cache_capacity(32 << 20)
            .open()
            .map_err(|e| anyhow::anyhow!("opening the session store in {}: {e}", dir.display()))?;
        let sessions = db.open_tree("sessions.v2")?;
        let queue = db.open_tree("queue.v2")?;
        let (tx, rx) = mpsc::channel();
        let (durable_tx, durable) = watch::channel(0);
        let writer = Writer { db, sessions: sessions.clone(), queue: queue.clone() };
        std::thread::Builder::new().name("session-store".into()).spawn(move || writer.run(rx, durable_tx))?;
        let handle = StoreHandle { submitter: Arc::new(Mutex::new(Submitter { next_ticket: 0, tx })), durable };
        Ok(SessionStore { sessions, queue, handle })
    }

    pub fn handle(&self) -> &StoreHandle {
        &self.handle
    }

    /// Every stored session with its queue; unreadable entries are reported and skipped.
    pub fn load(&self) -> Vec<LoadedSession> {
        let mut loaded = Vec::new();
        for entry in self.sessions.iter() {
            let Ok((key, value)) = entry.map_err(|e| tracing::error!(error = %e, "session store read failed")) else { continue };
            let client_id = String::from_utf8_lossy(&key).into_owned();
            let session: StoredSession = match postcard::from_bytes(&value) {
                Ok(session) => session,
                Err(e) => {
                    tracing::error!(%client_id, error = %e, "stored session unreadable; skipped");
                    continue;
                }
            };
            let mut queued = Vec::new();
            for item in self.queue.scan_prefix(queue_prefix(&client_id)) {
                let Ok((key, value)) = item else { continue };
                let sequence = key[key.len().saturating_sub(8)..].try_into().map(u64::from_be_bytes).unwrap_or_default();
                match postcard::from_bytes::<StoredMessage>(&value) {
                    Ok(message) => queued.push((sequence, message.into_delivery())),
                    Err(e) => tracing::error!(%client_id, sequence, error = %e, "stored message unreadable; skipped"),
                }
            }
            loaded.push(LoadedSession { client_id, session, queued });
        }
        loaded
    }
}

/// The writer thread's side of the store.
struct Writer {
    db: sled::Db,
    sessions: sled::Tree,
    queue: sled::Tree,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<(u64, StoreOp)>, durable: watch::Sender<u64>) {
        while let Ok(first) = rx.recv() {
            let mut last = first.0;
            self.apply(first.1);
            while let Ok((ticket, op)) = rx.try_recv() {
                last = ticket;
                self.apply(op);
                if ticket - first.0 >= MAX_BATCH as u64 {
                    break;
                }
            }
            if let Err(e) = self.db.flush() {
                tracing::error!(error = %e, "session store flush failed");
            }
            durable.send_replace(last);
        }
    }

    fn apply(&self, op: StoreOp) {
        let result = match op {
            StoreOp::Save { client_id, session, queued } => self.clear_queue(&client_id).and_then(|_| {
                for (sequence, message) in &queued {
                    self.queue.insert(queue_key(&client_id, *sequence), encode(message))?;
                }
                self.sessions.insert(client_id.as_bytes(), encode(&*session)).map(|_| ())
            }),
            StoreOp::Enqueue { client_id, sequence, message } => {
                self.queue.insert(queue_key(&client_id, sequence), encode(&*message)).map(|_| ())
            }
            StoreOp::Dequeue { client_id, sequence } => self.queue.remove(queue_key(&client_id, sequence)).map(|_| ()),
            StoreOp::Remove { client_id } => {
                self.clear_queue(&client_id).and_then(|_| self.sessions.remove(client_id.as_bytes()).map(|_| ()))
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "session store write failed");
        }
    }

    fn clear_queue(&self, client_id: &str) -> sled::Result<()> {
        let keys: Vec<sled::IVec> = self.queue.scan_prefix(queue_prefix(client_id)).keys().collect::<Result<_, _>>()?;
        for key in keys {
            self.queue.remove(key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_stored_in_the_same_bytes_as_before_they_were_byte_strings() {
        // Records written when payloads were `Vec<u8>` (a sequence of bytes) still decode.
        let payload: Vec<u8> = (0..=255).collect();
        assert_eq!(encode(&Bytes::from(payload.clone())), encode(&payload));
        let decoded: Bytes = postcard::from_bytes(&encode(&payload)).unwrap();
        assert_eq!(decoded, payload);
    }

    fn delivery(topic: &str, n: u8) -> Delivery {
        let message = Message {
            topic: topic.into(),
            payload: Bytes::from(vec![n]),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: None,
            expires_at: None,
            publisher: None,
            id: None,
        };
        Delivery { message: Arc::new(message), qos: QoS::AtLeastOnce, retain: false, subscription_ids: vec![3], shared: None }
    }

    #[tokio::test]
    async fn saved_sessions_and_appended_messages_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Owner::Certificate { identity: "app".into(), issuer: "CN=CA".into() };
        {
            let store = SessionStore::open(dir.path()).unwrap();
            let mut state = SessionState::new(1, owner.clone(), 10);
            state.expiry = Duration::from_secs(60);
            state.awaiting_pubrel.insert(7);
            state.inflight.insert(4, (2, Inflight::Released));
            state.inflight.insert(5, (1, Inflight::Publish(delivery("a", 0))));
            let session = Box::new(StoredSession::capture(&state, Instant::now() + state.expiry));
            let id: Arc<str> = "app-1".into();
            let h = store.handle();
            h.submit(StoreOp::Save { client_id: id.clone(), session, queued: vec![(1, StoredMessage::from_delivery(&delivery("b", 1)))] });
            for n in 2..5 {
                h.submit(StoreOp::Enqueue {
                    client_id: id.clone(),
                    sequence: n,
                    message: Box::new(StoredMessage::from_delivery(&delivery("c", n as u8))),
                });
            }
            let ticket = h.submit(StoreOp::Dequeue { client_id: id.clone(), sequence: 3 });
            h.submit(StoreOp::Save {
                client_id: "gone".into(),
                session: Box::new(StoredSession::capture(&state, Instant::now())),
                queued: Vec::new(),
            });
            h.submit(StoreOp::Remove { client_id: "gone".into() });
            h.durable(ticket).await;
            h.sync().await;
        }
        // The writer thread lets go of the database once the last handle is gone.
        let reopened = (0..100).find_map(|_| {
            SessionStore::open(dir.path()).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(20));
                None
            })
        });
        let mut loaded = reopened.expect("store reopens").load();
        assert_eq!(loaded.len(), 1);
        let LoadedSession { client_id, mut session, queued } = loaded.remove(0);
        assert_eq!(client_id, "app-1");
        assert_eq!(session.owner, owner);
        assert_eq!(session.awaiting_pubrel, [7]);
        let inflight: Vec<(u16, u64, bool)> =
            session.take_inflight().map(|(id, seq, f)| (id, seq, matches!(f, Inflight::Released))).collect();
        assert_eq!(inflight, [(5, 1, false), (4, 2, true)]);
        let payloads: Vec<(u64, u8)> = queued.iter().map(|(seq, d)| (*seq, d.message.payload[0])).collect();
        assert_eq!(payloads, [(1, 1), (2, 2), (4, 4)]);
        assert_eq!(queued[0].1.subscription_ids, [3]);
    }
}
