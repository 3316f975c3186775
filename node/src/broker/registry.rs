//! The client registry: one session per client id, its persistent state, takeover and expiry.
//!
//! Each client id maps to a [`Slot`] whose session state sits behind an async mutex. A connected
//! client holds that lock for the life of its connection ([`Claim`]). A second connection with
//! the same client id bumps the slot's generation, which tells the holder to close, and then waits
//! for the lock: it resumes exactly the state the first connection left, in-flight messages
//! included.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedMutexGuard};

use super::index::SubscriptionOptions;
use super::mailbox::Mailbox;
use super::message::{Delivery, SessionId};

/// An outgoing QoS 1/2 message the client has not yet fully acknowledged.
#[derive(Debug, Clone)]
pub enum Inflight {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Delivery),
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// Everything a session keeps across connections.
#[derive(Debug)]
pub struct SessionRecord {
    pub id: SessionId,
    pub mailbox: Arc<Mailbox>,
    /// Subscriptions by the filter exactly as the client sent it (`$share/...` included).
    pub subscriptions: HashMap<String, SubscriptionOptions>,
    /// Unacknowledged outgoing messages by packet id, with the order they were sent in.
    pub inflight: HashMap<u16, (u64, Inflight)>,
    /// Incoming QoS 2 packet ids that got PUBREC and wait for PUBREL.
    pub awaiting_pubrel: HashSet<u16>,
    /// How long the session outlives its connection.
    pub expiry: Duration,
    /// When an offline session expires.
    pub expires_at: Option<Instant>,
    /// True once the session has been discarded; a waiting connection must start afresh.
    pub ended: bool,
    /// True once a connection has used this session, so a later one finds it present.
    pub started: bool,
    /// Kept in the session store across restarts (APPLICATION clients).
    pub durable: bool,
}

impl SessionRecord {
    fn new(id: SessionId, queue_capacity: usize) -> SessionRecord {
        SessionRecord {
            id,
            mailbox: Arc::new(Mailbox::new(queue_capacity)),
            subscriptions: HashMap::new(),
            inflight: HashMap::new(),
            awaiting_pubrel: HashSet::new(),
            expiry: Duration::ZERO,
            expires_at: None,
            ended: false,
            started: false,
            durable: false,
        }
    }
}

#[derive(Debug)]
pub struct Slot {
    state: Arc<tokio::sync::Mutex<SessionRecord>>,
    generation: watch::Sender<u64>,
}

/// A connection's exclusive hold on a session's state.
pub type Record = OwnedMutexGuard<SessionRecord>;

/// A connection's claim on a client id.
#[derive(Debug)]
pub struct Claim {
    pub client_id: String,
    /// Generation of this claim; the connection must close when the slot's generation moves on.
    pub generation: u64,
    pub taken_over: watch::Receiver<u64>,
    slot: Arc<Slot>,
}

impl Claim {
    /// True once another connection has claimed this client id.
    pub fn is_taken_over(&self) -> bool {
        *self.taken_over.borrow() != self.generation
    }

    /// A cheap handle that tells later whether this client reconnected (for delayed wills).
    pub fn reconnect_watch(&self) -> ReconnectWatch {
        ReconnectWatch { generation: self.generation, slot: self.slot.clone() }
    }
}

/// Tells whether the client id has been claimed again since a connection ended.
#[derive(Debug, Clone)]
pub struct ReconnectWatch {
    generation: u64,
    slot: Arc<Slot>,
}

impl ReconnectWatch {
    pub fn reconnected(&self) -> bool {
        *self.slot.generation.borrow() != self.generation
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the previous connection of this client id did not hand over its session within {0:?}")]
pub struct TakeoverTimeout(Duration);

/// Sessions removed from the registry (client id, record), whose subscriptions the broker must drop.
pub type Ended = Vec<(String, SessionRecord)>;

#[derive(Debug)]
pub struct Registry {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    next_id: AtomicU64,
    queue_capacity: usize,
}

impl Registry {
    pub fn new(queue_capacity: usize) -> Registry {
        Registry { slots: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1), queue_capacity }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn new_session_id(&self) -> SessionId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Claims the session of `client_id`, taking it over from a connected client if there is
    /// one. Returns the claim and whether an earlier session state was found (not yet checked
    /// for clean start or expiry: see [`Registry::start`]).
    pub async fn claim(&self, client_id: &str, wait: Duration) -> Result<(Claim, Record), TakeoverTimeout> {
        let (slot, generation) = {
            let mut slots = self.slots();
            let slot = slots
                .entry(client_id.to_string())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        state: Arc::new(tokio::sync::Mutex::new(SessionRecord::new(self.new_session_id(), self.queue_capacity))),
                        generation: watch::channel(0).0,
                    })
                })
                .clone();
            let mut generation = 0;
            slot.generation.send_modify(|g| {
                *g += 1;
                generation = *g;
            });
            (slot, generation)
        };
        let record = tokio::time::timeout(wait, slot.state.clone().lock_owned()).await.map_err(|_| TakeoverTimeout(wait))?;
        let claim = Claim { client_id: client_id.to_string(), generation, taken_over: slot.generation.subscribe(), slot };
        Ok((claim, record))
    }

    /// Prepares a claimed record for a new connection: a fresh session when `clean_start`, when
    /// the old one ended or expired. Returns the discarded old record (its subscriptions must be
    /// removed from the index) and whether a session is present.
    pub fn start(&self, record: &mut SessionRecord, clean_start: bool, now: Instant) -> (Option<SessionRecord>, bool) {
        let expired = record.expires_at.is_some_and(|at| at <= now);
        let existed = record.started && !record.ended;
        let discarded = if clean_start || expired || record.ended {
            let fresh = SessionRecord::new(self.new_session_id(), self.queue_capacity);
            let old = std::mem::replace(record, fresh);
            old.mailbox.close();
            Some(old)
        } else {
            None
        };
        let present = discarded.is_none() && existed;
        record.expires_at = None;
        record.started = true;
        record.mailbox.set_online(true);
        (discarded, present)
    }

    /// Releases a claim when its connection ends. A session with expiry zero ends now and is
    /// returned; otherwise it stays, offline, until it expires.
    pub fn release(&self, claim: Claim, mut record: Record, now: Instant) -> Option<SessionRecord> {
        record.mailbox.set_online(false);
        if !record.expiry.is_zero() {
            record.expires_at = Some(now + record.expiry);
            return None;
        }
        let ended = self.end(&mut record);
        let mut slots = self.slots();
        if !claim.is_taken_over() {
            if let Some(current) = slots.get(&claim.client_id) {
                if Arc::ptr_eq(current, &claim.slot) {
                    slots.remove(&claim.client_id);
                }
            }
        }
        Some(ended)
    }

    fn end(&self, record: &mut SessionRecord) -> SessionRecord {
        let ended = std::mem::replace(record, SessionRecord::new(self.new_session_id(), self.queue_capacity));
        ended.mailbox.close();
        record.ended = true;
        ended
    }

    /// Removes offline sessions whose expiry has passed.
    pub fn expire(&self, now: Instant) -> Ended {
        let mut slots = self.slots();
        let mut ended = Vec::new();
        slots.retain(|client_id, slot| {
            let Ok(mut record) = slot.state.try_lock() else { return true };
            if record.expires_at.is_some_and(|at| at <= now) {
                ended.push((client_id.clone(), self.end(&mut record)));
                false
            } else {
                true
            }
        });
        ended
    }

    /// Puts back a session read from the session store, offline until its client reconnects.
    pub fn restore(&self, client_id: &str, build: impl FnOnce(SessionRecord) -> SessionRecord) {
        let record = build(SessionRecord::new(self.new_session_id(), self.queue_capacity));
        let slot = Arc::new(Slot { state: Arc::new(tokio::sync::Mutex::new(record)), generation: watch::channel(0).0 });
        self.slots().insert(client_id.to_string(), slot);
    }

    /// Calls `visit` with every offline session (one whose client is not connected).
    pub fn for_each_offline(&self, mut visit: impl FnMut(&str, &SessionRecord)) {
        for (client_id, slot) in self.slots().iter() {
            if let Ok(record) = slot.state.try_lock() {
                if !record.ended {
                    visit(client_id, &record);
                }
            }
        }
    }

    /// Number of sessions (online and offline).
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn takeover_hands_over_the_session() {
        let registry = Registry::new(10);
        let now = Instant::now();
        let (first, mut record) = registry.claim("c", WAIT).await.unwrap();
        let (_, present) = registry.start(&mut record, false, now);
        assert!(!present);
        record.expiry = Duration::from_secs(60);
        record.subscriptions.insert(
            "a/b".into(),
            SubscriptionOptions { qos: mqttbytes::QoS::AtLeastOnce, no_local: false, retain_as_published: false, subscription_id: None },
        );
        let id = record.id;
        let second = tokio::spawn({
            let registry = Arc::new(registry);
            async move {
                let (_claim, mut record) = registry.claim("c", WAIT).await.unwrap();
                let (_, present) = registry.start(&mut record, false, Instant::now());
                (record.id, present)
            }
        });
        while !first.is_taken_over() {
            tokio::task::yield_now().await;
        }
        drop(record);
        assert_eq!(second.await.unwrap(), (id, true));
    }

    #[tokio::test]
    async fn clean_start_discards_and_expiry_ends() {
        let registry = Registry::new(10);
        let now = Instant::now();
        let (claim, mut record) = registry.claim("c", WAIT).await.unwrap();
        registry.start(&mut record, false, now);
        record.expiry = Duration::from_secs(5);
        let old_id = record.id;
        assert!(registry.release(claim, record, now).is_none());
        assert_eq!(registry.len(), 1);
        assert!(registry.expire(now + Duration::from_secs(4)).is_empty());
        let ended = registry.expire(now + Duration::from_secs(6));
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].1.id, old_id);
        assert!(registry.is_empty());

        let (claim, mut record) = registry.claim("d", WAIT).await.unwrap();
        registry.start(&mut record, false, now);
        record.expiry = Duration::from_secs(3600);
        registry.release(claim, record, now);
        let (_claim, mut record) = registry.claim("d", WAIT).await.unwrap();
        let (discarded, present) = registry.start(&mut record, true, now);
        assert!(discarded.is_some());
        assert!(!present);
    }

    #[tokio::test]
    async fn zero_expiry_ends_at_release() {
        let registry = Registry::new(10);
        let (claim, mut record) = registry.claim("c", WAIT).await.unwrap();
        registry.start(&mut record, false, Instant::now());
        assert!(registry.release(claim, record, Instant::now()).is_some());
        assert!(registry.is_empty());
    }
}
