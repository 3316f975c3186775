//! The broker core behind one cheap-clone handle, [`Broker`]: sessions attach and detach, publish,
//! subscribe and unsubscribe through it; its subscription index, retained store, client registry
//! and session store stay private. Knows nothing of bytes or sockets.

pub mod clients;
pub mod index;
pub mod mailbox;
pub mod message;
pub mod persist;
pub mod registry;
pub mod remote;
pub mod retained;
mod shared;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::auth::policy::{AuthPolicy, Owner};
use crate::telemetry::metrics::RetainedLimit;
use index::{Subscriber, SubscriptionIndex, SubscriptionOptions};
use message::{min_qos, Delivery, Message, MessageId, SharedDelivery, Will, WillCheck};
use persist::{MovedMessage, MovedSession, SessionStore, StoredSession};
pub use registry::{AttachError, Attached, Attachment};
use registry::{Ownership, Registry};
pub use remote::{BarrierFuture, ClaimFuture, Forwarding, Remote, RemoteAcks, TailFuture};
use retained::{RetainedEntry, RetainedStore, SetOutcome, Stamp};
pub use state::{Inflight, SessionState};

use crate::telemetry::metrics::Gauges;
use crate::topic;

/// How long after a session move a message reaching the session a second time is still
/// recognised and dropped.
const MOVE_DUPLICATE_WINDOW: Duration = Duration::from_secs(5);

/// Broker-wide behaviour settings (from the `[limits]` config section).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Messages a session queues before the overflow policy applies (DEVICE clients and
    /// clients without a credential).
    pub max_queued_messages: usize,
    /// The same for APPLICATION clients.
    pub application_max_queued_messages: usize,
    /// How long a publisher waits for room in full online subscriber queues (one deadline for
    /// all of them).
    pub slow_subscriber_timeout: Duration,
    /// How long a new connection waits for the previous connection of its client id to hand over.
    pub takeover_timeout: Duration,
    /// Sessions (online and offline) one certificate identity or password credential may hold.
    pub max_sessions_per_identity: usize,
    /// Sessions (online and offline) all anonymous clients together may hold.
    pub max_anonymous_sessions: usize,
    /// Whose client ids are whose: a principal the policy binds an id to takes it from a
    /// session another principal left there.
    pub client_ids: AuthPolicy,
    /// How many retained messages, and how many bytes of them, this node keeps.
    pub retained: retained::RetainedLimits,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            max_queued_messages: 1000,
            application_max_queued_messages: 100_000,
            slow_subscriber_timeout: Duration::from_secs(5),
            takeover_timeout: Duration::from_secs(10),
            max_sessions_per_identity: 100,
            max_anonymous_sessions: 10_000,
            client_ids: AuthPolicy::default(),
            retained: retained::RetainedLimits::default(),
        }
    }
}

/// What a connection asks for when it attaches to its session.
#[derive(Debug, Clone)]
pub struct AttachRequest<'a> {
    pub client_id: &'a str,
    pub owner: &'a Owner,
    pub clean_start: bool,
    /// The session is kept in the session store while offline (APPLICATION clients).
    pub durable: bool,
    /// Offline queue limit for the client type.
    pub queue_capacity: usize,
}

/// Whom a message routed here is for.
enum Audience<'a> {
    /// Published here: every matching subscriber and one member of every matching shared group.
    Everyone,
    /// Forwarded from another node: the matching subscribers (if `to_subscribers`), and one
    /// member of each of the shared groups `shared` (`$share/<group>/<filter>`), `redispatched`
    /// when a node passed it on after its member there did not take it.
    Forwarded { to_subscribers: bool, shared: &'a [String], redispatched: bool },
}

/// What routing one message did.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Sessions the message was queued for.
    pub queued: usize,
    /// The session-store write to wait for before acknowledging the publisher, if any.
    pub durable_ticket: Option<u64>,
    /// The other nodes' acknowledgements to wait for before acknowledging the publisher (PUBACK
    /// policy `cluster`), if any.
    pub remote_acks: Option<Arc<RemoteAcks>>,
    /// The publisher's retained quota refused the message: it went nowhere.
    pub over_quota: Option<RetainedLimit>,
}

/// The filters this node has local subscribers for, and the shared groups it has members of (as
/// `$share/<group>/<filter>`), with a version that moves on every change, for announcing routes
/// to other nodes.
#[derive(Debug)]
struct LocalRoutes {
    counts: Mutex<HashMap<String, usize>>,
    version: watch::Sender<u64>,
}

impl LocalRoutes {
    fn change(&self, filter: &str, added: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if added {
            let count = counts.entry(filter.to_string()).or_default();
            *count += 1;
            *count == 1
        } else {
            match counts.get_mut(filter) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => counts.remove(filter).is_some(),
                None => false,
            }
        };
        drop(counts);
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
    }
}

/// A session moving to another node: kept here, collecting messages, until the move is settled.
struct MovingOut {
    session: SessionState,
    /// The node it moves to: only that node's word settles the move.
    to: u64,
    /// The sequence of the newest queued message the new node has a copy of.
    through: u64,
    /// When it is given back unless settled.
    deadline: tokio::time::Instant,
}

/// The broker. Cloning is cheap; every clone is the same broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    index: SubscriptionIndex,
    retained: RetainedStore,
    registry: Registry,
    settings: BrokerSettings,
    /// Where durable (APPLICATION) sessions are kept; `None`: all sessions in memory only.
    store: Option<SessionStore>,
    routes: LocalRoutes,
    /// Set once when the node is part of a cluster.
    remote: OnceLock<Arc<dyn Remote>>,
    /// Sessions moving to another node, kept until the move is settled (by client id).
    moving_out: Mutex<HashMap<String, MovingOut>>,
    /// This node's id in the cluster, and the number of the next message published here.
    node_id: OnceLock<u64>,
    next_message: AtomicU64,
}

impl Broker {
    pub fn new(settings: BrokerSettings, store: Option<SessionStore>) -> Broker {
        let broker = Broker {
            inner: Arc::new(Inner {
                index: SubscriptionIndex::new(),
                retained: RetainedStore::new(settings.retained),
                registry: Registry::new(
                    settings.max_queued_messages,
                    Ownership {
                        max_per_owner: settings.max_sessions_per_identity,
                        max_anonymous: settings.max_anonymous_sessions,
                        client_ids: settings.client_ids,
                    },
                ),
                settings,
                store,
                routes: LocalRoutes { counts: Mutex::new(HashMap::new()), version: watch::channel(0).0 },
                remote: OnceLock::new(),
                moving_out: Mutex::new(HashMap::new()),
                node_id: OnceLock::new(),
                next_message: AtomicU64::new(rand_core::RngCore::next_u64(&mut rand_core::OsRng)),
            }),
        };
        broker.restore_sessions();
        broker
    }

    /// A client id for a client that sent none.
    pub fn generate_client_id(&self) -> String {
        format!("rampart-{}", self.inner.registry.new_session_id())
    }

    /// Puts the stored durable sessions back, offline, with their subscriptions and messages.
    fn restore_sessions(&self) {
        let Some(store) = &self.inner.store else { return };
        let loaded = store.load();
        let count = loaded.len();
        for mut stored in loaded {
            let mut session =
                SessionState::new(self.inner.registry.new_session_id(), stored.session.owner.clone(), self.queue_capacity(true));
            session.durable = true;
            session.expiry = stored.session.expiry();
            session.awaiting_pubrel = stored.session.awaiting_pubrel.iter().copied().collect();
            session.inflight = stored.session.take_inflight().map(|(id, seq, f)| (id, (seq, f))).collect();
            for (filter, options) in stored.session.subscriptions() {
                self.add_subscription(&mut session, filter, options);
            }
            let client_id: Arc<str> = stored.client_id.into();
            session.mailbox.restore(stored.queued, client_id.clone(), store.handle().clone());
            self.inner.registry.restore(client_id, session, stored.session.expires_at());
        }
        if count > 0 {
            tracing::info!(sessions = count, "restored durable sessions");
        }
    }

    fn queue_capacity(&self, durable: bool) -> usize {
        match durable {
            true => self.inner.settings.application_max_queued_messages,
            false => self.inner.settings.max_queued_messages,
        }
    }

    /// Hands a connection the session of its client id (see [`Registry::attach`]): taken over
    /// from a live connection of the same owner, resumed, fresh, or moved here from another node
    /// (or several: a session one node gave back while another took it is merged).
    pub async fn attach(&self, request: AttachRequest<'_>, now: Instant) -> Result<Attached, AttachError> {
        let remote = self.inner.remote.get();
        let moved = match remote {
            Some(remote) => remote.claim(request.client_id, request.owner, request.clean_start).await?,
            None => Vec::new(),
        };
        let registry = &self.inner.registry;
        let attached =
            registry.attach(request.client_id, request.owner, request.clean_start, now, self.inner.settings.takeover_timeout).await;
        let mut attached = match (attached, remote) {
            (Ok(attached), _) => attached,
            (Err(e), Some(remote)) => {
                // The sessions released for this connection go back where they were.
                for (from, _) in &moved {
                    remote.settle_move(*from, request.client_id, false);
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        if let Some(old) = attached.discarded.take() {
            self.drop_subscriptions(&old);
        }
        attached.session.durable = request.durable && self.inner.store.is_some();
        attached.session.mailbox.set_capacity(request.queue_capacity);
        if !moved.is_empty() {
            attached.session.mailbox.set_moving_in(true);
            let mut froms = Vec::with_capacity(moved.len());
            for (from, moved) in moved {
                if attached.present {
                    tracing::warn!(client_id = request.client_id, from, "a session existed here and on another node; merged");
                    self.merge_moved(&mut attached.session, moved);
                } else {
                    self.install_moved(&mut attached.session, moved);
                    attached.present = true;
                }
                froms.push(from);
            }
            self.collect_move_tails(froms, request.client_id, attached.session.mailbox.clone());
        }
        Ok(attached)
    }

    /// The second phase of a session move, after the client has its CONNACK: once the other
    /// nodes route by this node's new subscriptions, each old node stops collecting messages for
    /// the session and hands over what it collected since the first phase (a message that came
    /// both ways is queued once); then the move is settled and the old node drops its copy.
    fn collect_move_tails(&self, froms: Vec<u64>, client_id: &str, mailbox: Arc<mailbox::Mailbox>) {
        let Some(remote) = self.inner.remote.get().cloned() else { return };
        let (client_id, version) = (client_id.to_string(), *self.inner.routes.version.borrow());
        tokio::spawn(async move {
            for from in froms {
                match remote.complete_move(from, &client_id, version).await {
                    Some(tail) => {
                        let count = tail.len();
                        for message in tail {
                            mailbox.push_congested(message.into_delivery());
                        }
                        remote.settle_move(from, &client_id, true);
                        tracing::info!(%client_id, from, messages = count, "session move completed");
                    }
                    // Unsettled, the old node keeps its copy and takes it back: a later
                    // connection of the client claims it again (at least once, never lost).
                    None => tracing::warn!(%client_id, from, "session move: the old node's tail did not arrive; it keeps its copy"),
                }
            }
            // Copies of the tail's messages still on their way here directly are recognised a
            // little longer.
            tokio::time::sleep(MOVE_DUPLICATE_WINDOW).await;
            mailbox.set_moving_in(false);
        });
    }

    /// Takes over the state of a session that moved here from another node.
    fn install_moved(&self, session: &mut SessionState, mut moved: MovedSession) {
        session.expiry = moved.session.expiry();
        session.awaiting_pubrel = moved.session.awaiting_pubrel.iter().copied().collect();
        session.inflight = moved.session.take_inflight().map(|(id, seq, f)| (id, (seq, f))).collect();
        self.merge_moved(session, moved);
    }

    /// Adds a moved session's subscriptions and queued messages to a session here.
    fn merge_moved(&self, session: &mut SessionState, moved: MovedSession) {
        for (filter, options) in moved.session.subscriptions() {
            self.add_subscription(session, filter, options);
        }
        session.mailbox.merge(moved.queued.into_iter().map(MovedMessage::into_delivery).collect());
    }

    /// Gives up this node's session of `client_id` to another node where a client of `owner`
    /// connects (see [`registry::Registry::release`]); returns a copy of its state unless
    /// `clean_start` or it ends with its connection. The session itself stays here — with its
    /// subscriptions, collecting what reaches it, and its stored copy when durable — until the
    /// move is settled ([`Broker::end_move`], [`Broker::give_back`]); unsettled after
    /// `abandon_after` (renewed when the new node asks for the tail), it is given back.
    pub async fn release(
        &self,
        client_id: &str,
        owner: &Owner,
        clean_start: bool,
        to: u64,
        abandon_after: Duration,
    ) -> Result<Option<MovedSession>, AttachError> {
        let now = Instant::now();
        let Some(session) = self.inner.registry.release(client_id, owner, now, self.inner.settings.takeover_timeout).await? else {
            return Ok(None);
        };
        // Another principal's session (the client-id policy gave the id to `owner`) ends here.
        if clean_start || session.expiry.is_zero() || session.owner != *owner {
            self.drop_subscriptions(&session);
            session.mailbox.close();
            tracing::info!(%client_id, "session ended: its client id connected on another node");
            return Ok(None);
        }
        let (queued, through) = session.mailbox.queued_after(0);
        let moved = MovedSession {
            session: StoredSession::capture(&session, now + session.expiry),
            queued: queued.iter().map(MovedMessage::from_delivery).collect(),
        };
        let id = session.id;
        let deadline = tokio::time::Instant::now() + abandon_after;
        let moving = MovingOut { session, to, through, deadline };
        self.moving_out().insert(client_id.to_string(), moving);
        tracing::info!(%client_id, queued = moved.queued.len(), "session handed to another node");
        let (broker, client_id) = (self.clone(), client_id.to_string());
        tokio::spawn(async move {
            // Given back unless settled in time; the deadline moves when the new node asks for the tail.
            loop {
                let deadline = match broker.moving_out().get(&client_id) {
                    Some(moving) if moving.session.id == id => moving.deadline,
                    _ => return,
                };
                if deadline <= tokio::time::Instant::now() {
                    broker.give_back(&client_id, to, "the new node did not settle the move in time");
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        });
        Ok(Some(moved))
    }

    fn moving_out(&self) -> MutexGuard<'_, HashMap<String, MovingOut>> {
        self.inner.moving_out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the session of `client_id` moving out of here to node `to` (not one moving
    /// elsewhere: a late word from an earlier move settles nothing).
    fn take_moving_out(&self, client_id: &str, to: u64) -> Option<MovingOut> {
        let mut moving_out = self.moving_out();
        moving_out.get(client_id).is_some_and(|m| m.to == to).then(|| moving_out.remove(client_id)).flatten()
    }

    /// The tail of a move out of this node, once the new node routes to the session: after
    /// `linger` (messages already on their way here still arrive meanwhile), copies of what
    /// the session collected since [`Broker::release`]. `None` when no move of `client_id` is
    /// under way here. The session stays until the move is settled (`abandon_after` from now).
    pub async fn finish_move(&self, client_id: &str, to: u64, linger: Duration, abandon_after: Duration) -> Option<Vec<MovedMessage>> {
        tokio::time::sleep(linger).await;
        let mut moving_out = self.moving_out();
        let moving = moving_out.get_mut(client_id).filter(|m| m.to == to)?;
        moving.deadline = tokio::time::Instant::now() + abandon_after;
        let (tail, through) = moving.session.mailbox.queued_after(moving.through);
        moving.through = through;
        Some(tail.iter().map(MovedMessage::from_delivery).collect())
    }

    /// The new node holds the session that moved out of here: its copy here (subscriptions,
    /// queue, stored copy) goes.
    pub fn end_move(&self, client_id: &str, to: u64) {
        let Some(moving) = self.take_moving_out(client_id, to) else { return };
        self.drop_subscriptions(&moving.session);
        moving.session.mailbox.close();
        tracing::info!(%client_id, to, "moved session settled; the copy here is dropped");
    }

    /// The session that was moving out of here stays here after all (the new node could not
    /// take it, or did not settle in time): offline again, as before its client connected
    /// elsewhere. Its messages go to a session of the same owner that started here meanwhile.
    pub fn give_back(&self, client_id: &str, to: u64, reason: &str) {
        let Some(moving) = self.take_moving_out(client_id, to) else { return };
        let session = moving.session;
        let queued = session.mailbox.len();
        match self.inner.registry.give_back(client_id, session, Instant::now()) {
            Ok(()) => tracing::warn!(%client_id, queued, %reason, "moved session taken back: it stays here, offline"),
            Err(occupied) => {
                let registry::Occupied { session, current } = *occupied;
                let (copies, _) = session.mailbox.queued_after(0);
                let merged = current.map_or(0, |mailbox| mailbox.merge(copies));
                let lost = queued - merged.min(queued);
                self.drop_subscriptions(&session);
                session.mailbox.close();
                (0..lost).for_each(|_| crate::telemetry::metrics::dropped(crate::telemetry::metrics::DropReason::MoveAbandoned));
                tracing::warn!(%client_id, queued, merged, lost, %reason, "moved session taken back while another session of its client id started here");
            }
        }
    }

    /// The default offline queue limit of a client type (durable: APPLICATION).
    pub fn default_queue_capacity(&self, durable: bool) -> usize {
        self.queue_capacity(durable)
    }

    /// Gives a session back when its connection ends: it ends now (expiry zero), or stays
    /// offline — saved to the session store when durable. The will, if any, is published after
    /// its delay unless the client reconnected meanwhile or its check then refuses it. Shared-group messages the session holds
    /// go to other members of their groups, unless another connection took the session over.
    /// Returns the store ticket of the save.
    pub fn detach(&self, attachment: Attachment, mut session: SessionState, will: Option<(Will, WillCheck)>, now: Instant) -> Option<u64> {
        if !attachment.is_taken_over() {
            self.redispatch_held(&mut session);
        }
        if let Some((will, check)) = will {
            self.schedule_will(will, check, session.expiry, &attachment);
        }
        let persist = match (&self.inner.store, session.durable && !session.expiry.is_zero()) {
            (Some(store), true) => {
                let stored = StoredSession::capture(&session, now + session.expiry);
                Some((attachment.client_id.clone(), store.handle().clone(), stored))
            }
            _ => None,
        };
        let ticket = session.mailbox.set_offline(persist);
        if let Some(ended) = self.inner.registry.detach(attachment, session, now) {
            self.drop_subscriptions(&ended);
        }
        ticket
    }

    fn schedule_will(&self, will: Will, check: WillCheck, expiry: Duration, attachment: &Attachment) {
        let broker = self.clone();
        let reconnected = attachment.reconnect_watch();
        let delay = will.delay.min(expiry);
        let client_id = attachment.client_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if delay.is_zero() || !reconnected.reconnected() {
                let publisher = match check(&will) {
                    Ok(publisher) => publisher,
                    Err(why) => {
                        tracing::info!(%client_id, topic = %will.topic, %why, "will not published");
                        crate::telemetry::metrics::dropped(crate::telemetry::metrics::DropReason::NotAuthorized);
                        return;
                    }
                };
                let published = broker.publish(will.into_message(Instant::now()), Some(&publisher)).await;
                if let Some(ticket) = published.durable_ticket {
                    broker.wait_durable(ticket).await;
                }
            }
        });
    }

    /// Connects the broker to the cluster's forwarding plane (once, at start); `node_id` goes
    /// into the stamps of retained messages published here.
    pub fn set_remote(&self, remote: Arc<dyn Remote>, node_id: u64) {
        self.inner.retained.set_node(node_id);
        let _ = self.inner.node_id.set(node_id);
        if self.inner.remote.set(remote).is_err() {
            tracing::error!("the forwarding plane was connected twice; the first stays");
        }
    }

    /// The filters with local subscribers (and the shared groups with local members) now, for
    /// route announcements.
    pub fn local_routes(&self) -> Vec<String> {
        self.inner.routes.counts.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Whether this node has local subscribers on `route` (a filter or `$share/<group>/<filter>`).
    pub fn has_local_route(&self, route: &str) -> bool {
        self.inner.routes.counts.lock().unwrap_or_else(|p| p.into_inner()).contains_key(route)
    }

    /// Waits, before a SUBACK, until the other nodes route by this node's subscriptions as they
    /// are now (the cluster's `suback_barrier`); at once on a single node.
    pub async fn routes_announced(&self) {
        if let Some(remote) = self.inner.remote.get() {
            let version = *self.inner.routes.version.borrow();
            remote.routes_announced(version).await;
        }
    }

    /// Changes whenever [`Broker::local_routes`] does.
    pub fn route_changes(&self) -> watch::Receiver<u64> {
        self.inner.routes.version.subscribe()
    }

    /// Routes a message published on this node: to the local sessions (see
    /// [`Broker::publish_forwarded`]), then to the nodes with matching subscribers.
    pub async fn publish(&self, mut message: Message, publisher: Option<&Owner>) -> Published {
        if let Some(node) = self.inner.node_id.get() {
            message.id = Some(MessageId { node: *node, number: self.inner.next_message.fetch_add(1, Ordering::Relaxed) });
        }
        let message = Arc::new(message);
        let stamp = match message.retain.then(|| self.inner.retained.set_local(message.clone(), publisher)) {
            Some((SetOutcome::Refused(limit @ (RetainedLimit::ClientMessages | RetainedLimit::ClientBytes)), _)) => {
                return Published { over_quota: Some(limit), ..Published::default() };
            }
            set => set.map(|(_, stamp)| stamp),
        };
        let (mut published, _) = self.route_locally(message.clone(), Audience::Everyone).await;
        if let Some(remote) = self.inner.remote.get() {
            let forwarding = remote.forward(&message, stamp);
            if let Some(room) = forwarding.room {
                room.await;
            }
            published.remote_acks = forwarding.acks;
        }
        published
    }

    /// Routes a message forwarded from another node to the local sessions (the subscribers when
    /// `to_subscribers`, one member of each group in `shared`); it goes no further. Shared groups
    /// get only what the publishing node chose this node for, so each group receives a message
    /// once cluster-wide; `redispatched` when another node passed it on for its groups (it is
    /// not passed on between nodes again). Returns the groups in `shared` without a member here
    /// (any longer).
    pub async fn publish_forwarded(
        &self,
        message: Arc<Message>,
        retained: Option<Stamp>,
        to_subscribers: bool,
        shared: &[String],
        redispatched: bool,
    ) -> (Published, Vec<String>) {
        if let (true, Some(stamp)) = (message.retain, retained) {
            self.inner.retained.merge(RetainedEntry { topic: message.topic.clone(), message: Some(message.clone()), stamp });
        }
        self.route_locally(message, Audience::Forwarded { to_subscribers, shared, redispatched }).await
    }

    /// Every retained message here (and every recently cleared topic), for another node.
    pub fn retained_entries(&self) -> Vec<RetainedEntry> {
        self.inner.retained.entries()
    }

    /// Takes another node's retained messages where they are newer than ours (after a link to it
    /// connects, e.g. when a partition heals).
    pub fn merge_retained(&self, entries: Vec<RetainedEntry>) {
        for entry in entries {
            self.inner.retained.merge(entry);
        }
    }

    /// Hands the message to the matching local sessions of `audience`. Waits while online
    /// subscribers' queues are full (flow control towards the publisher), for all of them at
    /// once, up to one deadline. Returns the shared groups asked for that have no member here.
    async fn route_locally(&self, message: Arc<Message>, audience: Audience<'_>) -> (Published, Vec<String>) {
        let mut waiting: Vec<(Arc<mailbox::Mailbox>, Delivery)> = Vec::new();
        let mut published = Published::default();
        let mut count = |pushed: mailbox::Pushed| {
            published.queued += usize::from(pushed.is_queued());
            published.durable_ticket = published.durable_ticket.max(pushed.ticket());
        };
        let publisher = message.publisher;
        let passed_on = matches!(audience, Audience::Forwarded { redispatched: true, .. });
        let mut deliver = |route: index::Route| {
            let delivery = Delivery {
                message: message.clone(),
                qos: min_qos(message.qos, route.qos),
                retain: message.retain && route.retain_as_published,
                subscription_ids: route.subscription_ids,
                shared: route.shared.map(|route| Box::new(SharedDelivery { route, tried: Vec::new(), passed_on })),
            };
            match route.mailbox.try_push(delivery) {
                Ok(pushed) => count(pushed),
                // The publisher's own queue: it cannot drain while it waits, so never wait on it.
                Err(delivery) if Some(route.session) == publisher => count(route.mailbox.push_congested(delivery)),
                Err(delivery) => waiting.push((route.mailbox, delivery)),
            }
        };
        let mut unserved = Vec::new();
        match audience {
            Audience::Everyone => self.inner.index.route(&message.topic, publisher, true, &mut deliver),
            Audience::Forwarded { to_subscribers, shared, .. } => {
                if to_subscribers {
                    self.inner.index.route(&message.topic, publisher, false, &mut deliver);
                }
                for route in shared {
                    let member = match topic::parse_filter(route, topic::TopicLimits::UNLIMITED) {
                        Ok(topic::ParsedFilter { share_group: Some(group), filter }) => self.inner.index.shared_member(filter, group, &[]),
                        _ => None,
                    };
                    match member {
                        Some(member) => deliver(member),
                        None => unserved.push(route.clone()),
                    }
                }
            }
        }
        if !waiting.is_empty() {
            let deadline = tokio::time::Instant::now() + self.inner.settings.slow_subscriber_timeout;
            let pushes = waiting.into_iter().map(|(mailbox, delivery)| async move { mailbox.push_wait(delivery, deadline).await });
            futures_util::future::join_all(pushes).await.into_iter().for_each(&mut count);
        }
        (published, unserved)
    }

    /// Waits for the other nodes' acknowledgements of published messages (bounded in time);
    /// false when one of the messages was dropped on its way to a node (it must not be
    /// acknowledged to its publisher).
    pub async fn wait_remote_acks(&self, acks: Vec<Arc<RemoteAcks>>) -> bool {
        if let (Some(remote), false) = (self.inner.remote.get(), acks.is_empty()) {
            remote.wait_acks(acks.clone()).await;
        }
        !acks.iter().any(|acks| acks.is_lost())
    }

    /// Waits until the session-store write `ticket` is on disk.
    pub async fn wait_durable(&self, ticket: u64) {
        if let Some(store) = &self.inner.store {
            store.handle().durable(ticket).await;
        }
    }

    /// Puts a subscription a live session decided on (`is_new`: added, else replaced) into the
    /// index, and announces a new filter to the other nodes. Returns the retained messages it
    /// gets when `with_retained`. The session keeps its own record of its subscriptions.
    pub fn subscribe(
        &self,
        session: &SessionState,
        filter: &str,
        options: SubscriptionOptions,
        (is_new, with_retained): (bool, bool),
    ) -> Vec<Delivery> {
        self.index_subscription(session, filter, options.clone(), is_new);
        if !with_retained {
            return Vec::new();
        }
        let parsed = topic::parse_filter(filter, topic::TopicLimits::UNLIMITED);
        let Ok(topic::ParsedFilter { share_group: None, filter }) = parsed else { return Vec::new() };
        (self.inner.retained.matching(filter).into_iter())
            .map(|message| Delivery {
                qos: min_qos(message.qos, options.qos),
                retain: true,
                subscription_ids: options.subscription_id.into_iter().collect(),
                message,
                shared: None,
            })
            .collect()
    }

    /// Adds a subscription to an offline session (restored or moved here) and to the index.
    fn add_subscription(&self, session: &mut SessionState, filter: &str, options: SubscriptionOptions) {
        let is_new = session.subscriptions.insert(filter.to_string(), options.clone()).is_none();
        self.index_subscription(session, filter, options, is_new);
    }

    fn index_subscription(&self, session: &SessionState, filter: &str, options: SubscriptionOptions, is_new: bool) {
        let Ok(parsed) = topic::parse_filter(filter, topic::TopicLimits::UNLIMITED) else {
            return;
        };
        let subscriber = Subscriber { session: session.id, mailbox: session.mailbox.clone(), options };
        self.inner.index.subscribe(parsed.filter, parsed.share_group, subscriber);
        if is_new {
            self.inner.routes.change(filter, true);
        }
    }

    /// Takes a subscription a live session removed out of the index.
    pub fn unsubscribe(&self, session: &SessionState, filter: &str) {
        self.remove_subscription(session.id, filter);
    }

    fn drop_subscriptions(&self, session: &SessionState) {
        for filter in session.subscriptions.keys() {
            self.remove_subscription(session.id, filter);
        }
    }

    fn remove_subscription(&self, session: message::SessionId, filter: &str) {
        if let Ok(parsed) = topic::parse_filter(filter, topic::TopicLimits::UNLIMITED) {
            self.inner.index.unsubscribe(parsed.filter, parsed.share_group, session);
            self.inner.routes.change(filter, false);
        }
    }

    /// Ends offline sessions whose expiry has passed.
    pub fn expire_sessions(&self, now: Instant) {
        for (_, mut session) in self.inner.registry.expire(now) {
            self.drop_subscriptions(&session);
            self.redispatch_held(&mut session);
            session.mailbox.close();
        }
    }

    /// Waits until every session-store write so far is on disk (at shutdown).
    pub async fn sync_store(&self) {
        if let Some(store) = &self.inner.store {
            store.handle().sync().await;
        }
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            sessions: self.inner.registry.len(),
            subscriptions: self.inner.index.len(),
            retained: self.inner.retained.len(),
            retained_bytes: self.inner.retained.bytes(),
            ..Gauges::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_node_a_session_moves_to_settles_the_move_and_a_failed_move_gives_it_back() {
        let broker = Broker::new(BrokerSettings::default(), None);
        let owner = Owner::Certificate { identity: "d".into(), issuer: "CN=CA".into() };
        let request = AttachRequest { client_id: "d-1", owner: &owner, clean_start: false, durable: false, queue_capacity: 10 };
        let mut attached = broker.attach(request.clone(), Instant::now()).await.unwrap();
        attached.session.expiry = Duration::from_secs(60);
        broker.detach(attached.attachment, attached.session, None, Instant::now());
        let abandon_after = Duration::from_secs(60);
        assert!(broker.release("d-1", &owner, false, 2, abandon_after).await.unwrap().is_some());
        // A late word from another node settles nothing.
        broker.end_move("d-1", 3);
        broker.give_back("d-1", 3, "a late word");
        assert!(broker.finish_move("d-1", 3, Duration::ZERO, abandon_after).await.is_none());
        assert!(broker.finish_move("d-1", 2, Duration::ZERO, abandon_after).await.is_some(), "still moving to node 2");
        broker.give_back("d-1", 2, "the new node could not take it");
        assert!(!broker.moving_out().contains_key("d-1"));
        assert!(broker.attach(request, Instant::now()).await.unwrap().present, "back here, resumable by its owner");
    }
}
