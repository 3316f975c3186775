//! What one session keeps across connections — its owner, subscriptions, messages in flight and
//! queued — as a plain value. A connection owns it while attached; the registry holds it while
//! the session is offline.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::index::SubscriptionOptions;
use super::mailbox::Mailbox;
use super::message::{Delivery, SessionId};
use crate::auth::policy::Owner;

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
pub struct SessionState {
    pub id: SessionId,
    pub owner: Owner,
    pub mailbox: Arc<Mailbox>,
    /// Subscriptions by the filter exactly as the client sent it (`$share/...` included).
    pub subscriptions: HashMap<String, SubscriptionOptions>,
    /// Unacknowledged outgoing messages by packet id, with the order they were sent in.
    pub inflight: HashMap<u16, (u64, Inflight)>,
    /// Incoming QoS 2 packet ids that got PUBREC and wait for PUBREL.
    pub awaiting_pubrel: HashSet<u16>,
    /// How long the session outlives its connection.
    pub expiry: Duration,
    /// Kept in the session store across restarts (APPLICATION clients).
    pub durable: bool,
}

impl SessionState {
    pub fn new(id: SessionId, owner: Owner, queue_capacity: usize) -> SessionState {
        SessionState {
            id,
            owner,
            mailbox: Arc::new(Mailbox::new(queue_capacity)),
            subscriptions: HashMap::new(),
            inflight: HashMap::new(),
            awaiting_pubrel: HashSet::new(),
            expiry: Duration::ZERO,
            durable: false,
        }
    }
}
