//! The client registry: one session per client id, who owns it, its hand-over between
//! connections, and expiry.
//!
//! Each client id maps to a [`Slot`]. While a client is connected, its connection owns the
//! [`SessionState`] and the slot is empty; when the connection ends the state goes back into the
//! slot. A second connection with the same client id — only by the session's owner — bumps the
//! slot's generation, which tells the holder to close, and waits for the state to come back: it
//! resumes exactly what the first connection left, messages in flight included.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::mailbox::Mailbox;
use super::message::SessionId;
use super::state::SessionState;
use crate::auth::policy::{AuthPolicy, Owner};

#[derive(Debug)]
struct SlotState {
    /// The session, while no connection holds it.
    session: Option<SessionState>,
    /// The session's mailbox (also while a connection holds it).
    mailbox: Arc<Mailbox>,
    /// Who the session belongs to (also while a connection holds it).
    owner: Owner,
    /// False until a connection has used the session (a new slot holds a blank one).
    started: bool,
    /// When the offline session expires.
    expires_at: Option<Instant>,
}

impl SlotState {
    /// Keeps `session` until a connection takes it.
    fn hold(&mut self, session: SessionState) {
        self.mailbox = session.mailbox.clone();
        self.session = Some(session);
    }
}

#[derive(Debug)]
pub struct Slot {
    state: Mutex<SlotState>,
    /// Signalled when a connection hands the session back.
    handed_back: Notify,
    generation: watch::Sender<u64>,
}

impl Slot {
    fn new(session: SessionState, started: bool, expires_at: Option<Instant>) -> Arc<Slot> {
        let (owner, mailbox) = (session.owner.clone(), session.mailbox.clone());
        Arc::new(Slot {
            state: Mutex::new(SlotState { session: Some(session), mailbox, owner, started, expires_at }),
            handed_back: Notify::new(),
            generation: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's hold on a client id.
#[derive(Debug)]
pub struct Attachment {
    pub client_id: Arc<str>,
    generation: u64,
    /// Changes when another connection claims this client id; the holder must then close.
    pub taken_over: watch::Receiver<u64>,
    slot: Arc<Slot>,
}

impl Attachment {
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

/// Why a connection could not have the session of its client id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("the session of this client id belongs to {owner}, not to {requester}")]
    NotOwner { owner: Owner, requester: Owner },
    #[error("the previous connection of this client id did not hand over its session within {0:?}")]
    TakeoverTimeout(Duration),
    #[error("a later connection with this client id claimed the session first")]
    Superseded,
    #[error("{owner} already holds {limit} sessions (max_sessions_per_identity)")]
    TooManySessions { owner: Owner, limit: usize },
    #[error("nodes {0:?} did not answer whether they hold this client id's session (cluster.remote_session_unreachable = \"refuse\")")]
    PeersUnreachable(Vec<u64>),
}

impl AttachError {
    /// The CONNACK code of a CONNECT refused with this error.
    pub fn connect_code(&self) -> mqttbytes::v5::ConnectReturnCode {
        use mqttbytes::v5::ConnectReturnCode;
        match self {
            AttachError::NotOwner { .. } => ConnectReturnCode::NotAuthorized,
            AttachError::TooManySessions { .. } => ConnectReturnCode::QuotaExceeded,
            AttachError::TakeoverTimeout(_) | AttachError::Superseded => ConnectReturnCode::ServerBusy,
            AttachError::PeersUnreachable(_) => ConnectReturnCode::ServerUnavailable,
        }
    }
}

/// A session given back while its client id had a session here again.
#[derive(Debug)]
pub struct Occupied {
    /// The session given back.
    pub session: SessionState,
    /// The mailbox of the session now here, when it has the same owner.
    pub current: Option<Arc<Mailbox>>,
}

/// A session handed to a connection.
#[derive(Debug)]
pub struct Attached {
    pub attachment: Attachment,
    pub session: SessionState,
    /// Whether an earlier session was resumed (CONNACK session present).
    pub present: bool,
    /// A session discarded by clean start or expiry, whose subscriptions must be dropped.
    pub discarded: Option<SessionState>,
}

#[derive(Debug, Default)]
struct Slots {
    by_client_id: HashMap<Arc<str>, Arc<Slot>>,
    /// Started sessions per owner (all anonymous clients count as one).
    per_owner: HashMap<Owner, usize>,
}

impl Slots {
    fn count(&mut self, owner: &Owner, delta: isize) {
        let count = self.per_owner.entry(owner.clone()).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.per_owner.remove(owner);
        }
    }
}

/// Who may hold how many sessions, and whose client ids are whose.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    /// Sessions one principal may hold.
    pub max_per_owner: usize,
    /// Sessions all anonymous clients together may hold.
    pub max_anonymous: usize,
    /// The client-id policy: a principal it binds an id to takes the id from a session of a
    /// principal it does not bind it to.
    pub client_ids: AuthPolicy,
}

impl Ownership {
    fn limit(&self, owner: &Owner) -> usize {
        if *owner == Owner::Anonymous {
            self.max_anonymous
        } else {
            self.max_per_owner
        }
    }

    /// Whether `requester` may have the session of `client_id` that `holder` holds.
    fn may_take(&self, requester: &Owner, holder: &Owner, client_id: &str) -> bool {
        requester == holder || self.client_ids.supersedes(requester, holder, client_id)
    }
}

#[derive(Debug)]
pub struct Registry {
    slots: Mutex<Slots>,
    next_id: AtomicU64,
    queue_capacity: usize,
    ownership: Ownership,
}

impl Registry {
    pub fn new(queue_capacity: usize, ownership: Ownership) -> Registry {
        Registry { slots: Mutex::new(Slots::default()), next_id: AtomicU64::new(1), queue_capacity, ownership }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn new_session_id(&self) -> SessionId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn blank(&self, owner: Owner) -> SessionState {
        SessionState::new(self.new_session_id(), owner, self.queue_capacity)
    }

    /// Hands the session of `client_id` to a new connection of `owner`: refused when the
    /// session (live, or offline and not expired) belongs to another principal, unless the
    /// client-id policy binds the id to `owner` and not to that principal (its session is then
    /// discarded); otherwise a connected holder is told to close and its state is awaited (up
    /// to `wait`). The session is fresh when `clean_start`, when the old one expired, or when it
    /// was another principal's.
    pub async fn attach(
        &self,
        client_id: &str,
        owner: &Owner,
        clean_start: bool,
        now: Instant,
        wait: Duration,
    ) -> Result<Attached, AttachError> {
        let (client_id, slot, generation, counted) = {
            let mut slots = self.slots();
            let existing = slots.by_client_id.get_key_value(client_id).map(|(key, slot)| (key.clone(), slot.clone()));
            let (key, slot) = match existing {
                Some(found) => found,
                None => (client_id.into(), Slot::new(self.blank(owner.clone()), false, None)),
            };
            let counted = {
                let state = slot.lock();
                let live = state.started && state.expires_at.is_none_or(|at| at > now);
                if live && !self.ownership.may_take(owner, &state.owner, client_id) {
                    return Err(AttachError::NotOwner { owner: state.owner.clone(), requester: owner.clone() });
                }
                // A new session for `owner`: none was live, or another principal's is discarded.
                let starts = !live || state.owner != *owner;
                if starts {
                    let (held, limit) = (slots.per_owner.get(owner).copied().unwrap_or(0), self.ownership.limit(owner));
                    if held >= limit {
                        crate::telemetry::metrics::client_limit_refusal(crate::telemetry::metrics::ClientLimit::SessionsPerIdentity);
                        return Err(AttachError::TooManySessions { owner: owner.clone(), limit });
                    }
                    if live {
                        tracing::info!(client_id, holder = %state.owner, %owner, "client id taken from a principal the client-id policy does not bind it to");
                    }
                    if state.started {
                        slots.count(&state.owner, -1);
                    }
                    slots.count(owner, 1);
                }
                starts
            };
            slots.by_client_id.insert(key.clone(), slot.clone());
            let mut generation = 0;
            slot.generation.send_modify(|g| {
                *g += 1;
                generation = *g;
            });
            (key, slot, generation, counted)
        };
        let mut session = self.wait_for_hand_back(&slot, generation, wait).await?;
        let (started, expires_at) = {
            let mut state = slot.lock();
            let taken = (state.started, state.expires_at);
            state.owner = owner.clone();
            state.started = true;
            state.expires_at = None;
            taken
        };
        if !started && !counted {
            // The session ended while this connection waited for it: a new one starts.
            self.slots().count(owner, 1);
        }
        let expired = expires_at.is_some_and(|at| at <= now);
        // Never hand a session to another principal, whatever raced with this attach.
        let fresh_needed = clean_start || expired || !started || session.owner != *owner;
        let discarded = fresh_needed.then(|| {
            let old = std::mem::replace(&mut session, self.blank(owner.clone()));
            old.mailbox.close();
            old
        });
        let present = started && discarded.is_none();
        slot.lock().mailbox = session.mailbox.clone();
        session.mailbox.set_online();
        let taken_over = slot.generation.subscribe();
        Ok(Attached { attachment: Attachment { client_id, generation, taken_over, slot }, session, present, discarded })
    }

    async fn wait_for_hand_back(&self, slot: &Slot, generation: u64, wait: Duration) -> Result<SessionState, AttachError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let handed_back = slot.handed_back.notified();
            tokio::pin!(handed_back);
            handed_back.as_mut().enable();
            if *slot.generation.borrow() != generation {
                return Err(AttachError::Superseded);
            }
            if let Some(session) = slot.lock().session.take() {
                return Ok(session);
            }
            if tokio::time::timeout_at(deadline, handed_back).await.is_err() {
                return Err(AttachError::TakeoverTimeout(wait));
            }
        }
    }

    /// Gives up the session of `client_id` to another node where `requester` connects: refused
    /// when a live session belongs to another principal that `requester` may not take the id
    /// from (see [`Registry::attach`]); otherwise a connected holder is told to
    /// close (taken over), its state awaited (up to `wait`) and the session removed from this
    /// node. `None`: no live session here.
    pub async fn release(
        &self,
        client_id: &str,
        requester: &Owner,
        now: Instant,
        wait: Duration,
    ) -> Result<Option<SessionState>, AttachError> {
        let (slot, generation) = {
            let slots = self.slots();
            let Some(slot) = slots.by_client_id.get(client_id).cloned() else { return Ok(None) };
            {
                let state = slot.lock();
                let live = state.started && state.expires_at.is_none_or(|at| at > now);
                if !live {
                    return Ok(None);
                }
                if !self.ownership.may_take(requester, &state.owner, client_id) {
                    return Err(AttachError::NotOwner { owner: state.owner.clone(), requester: requester.clone() });
                }
            }
            let mut generation = 0;
            slot.generation.send_modify(|g| {
                *g += 1;
                generation = *g;
            });
            (slot, generation)
        };
        let session = self.wait_for_hand_back(&slot, generation, wait).await?;
        let mut slots = self.slots();
        {
            let mut state = slot.lock();
            state.hold(self.blank(Owner::Anonymous));
            state.owner = Owner::Anonymous;
            state.started = false;
            state.expires_at = None;
        }
        slots.count(&session.owner, -1);
        if slots.by_client_id.get(client_id).is_some_and(|current| Arc::ptr_eq(current, &slot)) && *slot.generation.borrow() == generation {
            slots.by_client_id.remove(client_id);
        }
        slot.handed_back.notify_waiters();
        Ok(Some(session))
    }

    /// Takes a session back from a connection that ended. A session with expiry zero ends now
    /// and is returned (its subscriptions must be dropped); otherwise it stays, offline, until it
    /// expires.
    pub fn detach(&self, attachment: Attachment, session: SessionState, now: Instant) -> Option<SessionState> {
        let slot = &attachment.slot;
        let ended = if session.expiry.is_zero() {
            session.mailbox.close();
            let mut state = slot.lock();
            state.hold(self.blank(Owner::Anonymous));
            state.owner = Owner::Anonymous;
            state.started = false;
            state.expires_at = None;
            Some(session)
        } else {
            let mut state = slot.lock();
            state.expires_at = Some(now + session.expiry);
            state.hold(session);
            None
        };
        if let Some(ended) = &ended {
            let mut slots = self.slots();
            slots.count(&ended.owner, -1);
            let current = slots.by_client_id.get(&attachment.client_id).is_some_and(|current| Arc::ptr_eq(current, slot));
            if current && !attachment.is_taken_over() {
                slots.by_client_id.remove(&attachment.client_id);
            }
        }
        slot.handed_back.notify_waiters();
        ended
    }

    /// Removes offline sessions whose expiry has passed; returns them (client id, state), for the
    /// caller to end (close their mailboxes).
    pub fn expire(&self, now: Instant) -> Vec<(Arc<str>, SessionState)> {
        let mut slots = self.slots();
        let mut ended = Vec::new();
        slots.by_client_id.retain(|client_id, slot| {
            // A slot some connection is attaching to is left to that connection.
            if Arc::strong_count(slot) > 1 {
                return true;
            }
            let mut state = slot.lock();
            let offline_expired = state.session.is_some() && state.expires_at.is_some_and(|at| at <= now);
            if !offline_expired {
                return true;
            }
            let session = state.session.take().expect("checked above");
            state.hold(self.blank(Owner::Anonymous));
            state.owner = Owner::Anonymous;
            state.started = false;
            state.expires_at = None;
            ended.push((client_id.clone(), session));
            false
        });
        for (_, session) in &ended {
            slots.count(&session.owner, -1);
        }
        ended
    }

    /// Puts back a session read from the session store, offline until its client reconnects.
    pub fn restore(&self, client_id: Arc<str>, session: SessionState, expires_at: Instant) {
        Self::insert_offline(&mut self.slots(), client_id, session, expires_at);
    }

    fn insert_offline(slots: &mut Slots, client_id: Arc<str>, session: SessionState, expires_at: Instant) {
        slots.count(&session.owner, 1);
        slots.by_client_id.insert(client_id, Slot::new(session, true, Some(expires_at)));
    }

    /// Puts back a session that was moving to another node, offline, unless its client id has
    /// a session here again: then it comes back with that session's mailbox when both have the
    /// same owner (so its messages can go there).
    pub fn give_back(&self, client_id: &str, session: SessionState, now: Instant) -> Result<(), Box<Occupied>> {
        let mut slots = self.slots();
        if let Some(slot) = slots.by_client_id.get(client_id) {
            let state = slot.lock();
            let same_owner = state.started && state.owner == session.owner;
            return Err(Box::new(Occupied { session, current: same_owner.then(|| state.mailbox.clone()) }));
        }
        let expires_at = now + session.expiry;
        Self::insert_offline(&mut slots, client_id.into(), session, expires_at);
        Ok(())
    }

    /// Number of sessions (online and offline).
    pub fn len(&self) -> usize {
        self.slots().by_client_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    fn cert(identity: &str) -> Owner {
        Owner::Certificate { identity: identity.into(), issuer: "CN=CA".into() }
    }

    fn ownership(max_per_owner: usize) -> Ownership {
        Ownership { max_per_owner, max_anonymous: 3, client_ids: AuthPolicy::default() }
    }

    #[tokio::test]
    async fn only_the_owner_resumes_or_takes_over() {
        let registry = Registry::new(10, ownership(100));
        let now = Instant::now();
        let mut a = registry.attach("device-1", &cert("device-1"), false, now, WAIT).await.unwrap();
        assert!(!a.present);
        a.session.expiry = Duration::from_secs(60);
        for intruder in [Owner::Anonymous, cert("device-10"), Owner::Password { username: "device-1".into() }] {
            let refused = registry.attach("device-1", &intruder, true, now, WAIT).await.unwrap_err();
            assert!(matches!(refused, AttachError::NotOwner { .. }), "live session: {refused}");
        }
        assert!(!a.attachment.is_taken_over(), "a refused attach does not disturb the holder");
        assert!(registry.detach(a.attachment, a.session, now).is_none());
        let refused = registry.attach("device-1", &Owner::Anonymous, false, now, WAIT).await.unwrap_err();
        assert!(matches!(refused, AttachError::NotOwner { .. }), "offline session: {refused}");
        let resumed = registry.attach("device-1", &cert("device-1"), false, now, WAIT).await.unwrap();
        assert!(resumed.present);
        registry.detach(resumed.attachment, resumed.session, now);
        let later = now + Duration::from_secs(61);
        let fresh = registry.attach("device-1", &Owner::Anonymous, false, later, WAIT).await.unwrap();
        assert!(!fresh.present, "an expired session belongs to nobody");
        assert!(fresh.discarded.is_some());
    }

    #[tokio::test]
    async fn a_principal_bound_to_a_client_id_takes_it_from_another_principals_session() {
        let registry = Arc::new(Registry::new(10, ownership(100)));
        let now = Instant::now();
        let mut squatter = registry.attach("device-2", &Owner::Anonymous, false, now, WAIT).await.unwrap();
        squatter.session.expiry = Duration::from_secs(3600);
        let squatted = squatter.session.id;
        let device = tokio::spawn({
            let registry = registry.clone();
            async move { registry.attach("device-2", &cert("device-2"), false, Instant::now(), WAIT).await }
        });
        while !squatter.attachment.is_taken_over() {
            tokio::task::yield_now().await;
        }
        registry.detach(squatter.attachment, squatter.session, now);
        let mut device = device.await.unwrap().unwrap();
        assert!(!device.present && device.session.id != squatted, "never the squatter's session");
        assert_eq!(device.discarded.as_ref().map(|s| s.id), Some(squatted));
        device.session.expiry = Duration::from_secs(60);
        registry.detach(device.attachment, device.session, now);
        for intruder in [Owner::Anonymous, cert("device-20"), Owner::Password { username: "device".into() }] {
            let refused = registry.attach("device-2", &intruder, false, now, WAIT).await.unwrap_err();
            assert!(matches!(refused, AttachError::NotOwner { .. }), "{intruder}: {refused}");
        }
        let same_name = Owner::Certificate { identity: "device-2".into(), issuer: "CN=Other CA".into() };
        let refused = registry.attach("device-2", &same_name, false, now, WAIT).await.unwrap_err();
        assert!(matches!(refused, AttachError::NotOwner { .. }), "bound to both: the first keeps it: {refused}");
    }

    #[tokio::test]
    async fn takeover_hands_over_the_session() {
        let registry = Arc::new(Registry::new(10, ownership(100)));
        let now = Instant::now();
        let mut first = registry.attach("c", &Owner::Anonymous, false, now, WAIT).await.unwrap();
        first.session.expiry = Duration::from_secs(60);
        let id = first.session.id;
        let second = tokio::spawn({
            let registry = registry.clone();
            async move {
                let attached = registry.attach("c", &Owner::Anonymous, false, Instant::now(), WAIT).await.unwrap();
                (attached.session.id, attached.present)
            }
        });
        while !first.attachment.is_taken_over() {
            tokio::task::yield_now().await;
        }
        registry.detach(first.attachment, first.session, now);
        assert_eq!(second.await.unwrap(), (id, true));
    }

    #[tokio::test]
    async fn expiry_zero_ends_at_detach_and_offline_sessions_expire() {
        let registry = Registry::new(10, ownership(100));
        let now = Instant::now();
        let a = registry.attach("a", &Owner::Anonymous, false, now, WAIT).await.unwrap();
        assert!(registry.detach(a.attachment, a.session, now).is_some());
        assert!(registry.is_empty());
        let mut b = registry.attach("b", &Owner::Anonymous, false, now, WAIT).await.unwrap();
        b.session.expiry = Duration::from_secs(5);
        registry.detach(b.attachment, b.session, now);
        assert!(registry.expire(now + Duration::from_secs(4)).is_empty());
        assert_eq!(registry.expire(now + Duration::from_secs(6)).len(), 1);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn release_gives_a_session_to_its_owner_on_another_node_only() {
        let registry = Arc::new(Registry::new(10, ownership(100)));
        let now = Instant::now();
        let mut live = registry.attach("device-1", &cert("device-1"), false, now, WAIT).await.unwrap();
        live.session.expiry = Duration::from_secs(60);
        let refused = registry.release("device-1", &Owner::Anonymous, now, WAIT).await.unwrap_err();
        assert!(matches!(refused, AttachError::NotOwner { .. }));
        assert!(registry.release("nobody", &Owner::Anonymous, now, WAIT).await.unwrap().is_none());
        let releasing = tokio::spawn({
            let registry = registry.clone();
            async move { registry.release("device-1", &cert("device-1"), Instant::now(), WAIT).await }
        });
        while !live.attachment.is_taken_over() {
            tokio::task::yield_now().await;
        }
        let id = live.session.id;
        registry.detach(live.attachment, live.session, now);
        let released = releasing.await.unwrap().unwrap().expect("the session");
        assert_eq!(released.id, id);
        assert!(registry.is_empty(), "the session is no longer here");
    }

    #[tokio::test]
    async fn sessions_per_identity_are_bounded() {
        let registry = Registry::new(10, ownership(2));
        let now = Instant::now();
        let owner = cert("app");
        let mut held = Vec::new();
        for id in ["app-1", "app-2"] {
            let mut a = registry.attach(id, &owner, false, now, WAIT).await.unwrap();
            a.session.expiry = Duration::from_secs(60);
            held.push(a);
        }
        let refused = registry.attach("app-3", &owner, false, now, WAIT).await.unwrap_err();
        assert!(matches!(refused, AttachError::TooManySessions { limit: 2, .. }));
        for id in ["anonymous-1", "anonymous-2", "anonymous-3"] {
            registry.attach(id, &Owner::Anonymous, false, now, WAIT).await.unwrap().session.expiry = Duration::from_secs(60);
        }
        let refused = registry.attach("anonymous-4", &Owner::Anonymous, false, now, WAIT).await.unwrap_err();
        assert!(matches!(refused, AttachError::TooManySessions { limit: 3, .. }), "all anonymous clients together: {refused}");
        let mut first = held.remove(0);
        first.session.expiry = Duration::ZERO;
        registry.detach(first.attachment, first.session, now);
        assert!(registry.attach("app-3", &owner, false, now, WAIT).await.is_ok(), "an ended session frees its place");
    }
}
