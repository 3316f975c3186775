//! Cross-node message routing over QUIC: one node-certificate mTLS link from every node to every
//! other member (the sender dials), each node's announcement of the filters it has local
//! subscribers for, and the forwarding of a publish to exactly the nodes with a matching route.
//! Raft is not involved: routes and messages never wait for a leader, and a node cut off from
//! the majority keeps serving its own clients.
//!
//! - [`frame`]: the wire format. [`routes`]: a peer's route table. [`queue`]: a peer's bounded
//!   outgoing queue.
//! - `link`: the dialling side of a link (routes out, messages out, acknowledgements in, replay
//!   after a reconnect). `inbound`: the accepting side (routes in, messages in and routed to the
//!   local sessions — each passing its subscriber's read check there — acknowledgements out).

pub mod frame;
mod inbound;
mod link;
pub mod queue;
pub mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand_core::RngCore;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::sync::watch;

use crate::auth::policy::Owner;
use crate::auth::store::AuthStore;
use crate::broker::message::Message;
use crate::broker::persist::{MovedMessage, MovedSession};
use crate::broker::retained::Stamp;
use crate::broker::{AttachError, BarrierFuture, Broker, ClaimFuture, Forwarding, Remote, RemoteAcks, TailFuture};
use crate::cluster::Cluster;
use crate::config::{Config, PubackPolicy, RemoteSessionUnreachable, SubackBarrier};
use crate::telemetry::metrics::LinkGauge;
use crate::tls::caller::NodeCertificate;
use frame::{ClaimOutcome, Control, MovedPart, Recipients};
use queue::{Outgoing, PeerQueue};
use routes::RouteTable;
use tokio::sync::oneshot;

/// How long the old node of a moved session keeps collecting messages for it after the new node
/// asked for the tail: messages already on their way to the old node still reach the session.
const MOVE_LINGER: Duration = Duration::from_millis(250);

/// This node's forwarding port and how the plane is sized (from `[cluster]`).
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    pub node_id: u64,
    /// UDP address of the QUIC endpoint.
    pub bind: SocketAddr,
    /// This node's certificate and key, and the cluster CA (the same as the cluster port's).
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    pub ca_file: std::path::PathBuf,
    /// Publish streams per link; a topic always travels on the same one (per-topic order).
    pub streams: u8,
    /// Messages waiting for one peer before the overflow policy applies.
    pub queue_messages: usize,
    /// QoS 1/2 messages sent to one peer and not yet acknowledged, kept for replay.
    pub replay_messages: usize,
    /// A link without any packet for this long is considered dead.
    pub idle_timeout: Duration,
    /// How long a CONNECT waits for the other nodes to give up the client id.
    pub claim_timeout: Duration,
    /// Refuse a CONNECT when some node could not be asked (`true`), or accept it (`false`).
    pub refuse_when_unreachable: bool,
    /// How long a SUBACK waits for the peers with a live link to apply the new route; zero:
    /// it does not wait (`suback_barrier = "local"`).
    pub suback_barrier: Duration,
    /// How long a QoS 1/2 publisher's acknowledgement waits for the peers with a live link the
    /// message went to; zero: it does not wait (`puback = "local"`).
    pub puback_cluster: Duration,
    /// How long a publisher waits for room with a live peer whose queue is full
    /// (`limits.slow_subscriber_timeout_ms`).
    pub slow_peer_timeout: Duration,
}

impl ForwardSettings {
    /// The settings of a node's `[cluster]` section (and the slow-subscriber timeout, which
    /// paces a slow peer as it paces a slow subscriber); `None` for a standalone node.
    pub fn of(config: &Config) -> Option<ForwardSettings> {
        let c = config.cluster.as_ref()?;
        Some(ForwardSettings {
            node_id: c.node_id,
            bind: c.quic_bind,
            cert_file: c.cert_file.clone(),
            key_file: c.key_file.clone(),
            ca_file: c.ca_file.clone(),
            streams: c.forward_streams,
            queue_messages: c.forward_queue_messages,
            replay_messages: c.forward_replay_messages,
            idle_timeout: Duration::from_millis(c.link_idle_timeout_ms),
            claim_timeout: Duration::from_millis(c.claim_timeout_ms),
            refuse_when_unreachable: c.remote_session_unreachable == RemoteSessionUnreachable::Refuse,
            suback_barrier: match c.suback_barrier {
                SubackBarrier::Local => Duration::ZERO,
                SubackBarrier::Ack => Duration::from_millis(c.suback_barrier_timeout_ms.max(1)),
            },
            puback_cluster: match c.puback {
                PubackPolicy::Local => Duration::ZERO,
                PubackPolicy::Cluster => Duration::from_millis(c.puback_cluster_timeout_ms.max(1)),
            },
            slow_peer_timeout: Duration::from_millis(config.limits.slow_subscriber_timeout_ms),
        })
    }
}

/// One other member, as this node sees it.
#[derive(Debug)]
pub struct Peer {
    pub node_id: u64,
    /// Where its forwarding port is (`host:port`).
    pub quic_addr: String,
    /// Messages waiting to be sent to it.
    pub queue: PeerQueue,
    /// The filters it announced on its link to us.
    routes: RwLock<RouteTable>,
    /// Whether it has announced its whole route table since this node started; until then every
    /// message goes to it (it routes by its own subscriptions), so a node that just started
    /// loses nothing for the other nodes' subscribers while it learns their routes.
    routes_known: AtomicBool,
    /// The version of our route table it confirmed having applied (the SUBACK barrier).
    routes_applied: watch::Sender<u64>,
    /// Its process incarnation, as announced; a new one resets what we know of it.
    incarnation: AtomicU64,
    /// The highest sequence delivered here per (incarnation, stream), for de-duplication; shared
    /// with the task reading that stream (one at a time, but an old one may linger briefly).
    delivered: Mutex<HashMap<(u64, u8), Arc<AtomicU64>>>,
    /// Whether our link to it is connected.
    up: AtomicBool,
    /// Messages sent on our link to it.
    forwarded: AtomicU64,
    /// QoS 1/2 messages dropped from the replay buffer unacknowledged (replay budget exceeded).
    replay_dropped: AtomicU64,
    /// Control frames (claims, tail requests, move settlements) waiting to go out on our link,
    /// and the answers awaited by request.
    control: Mutex<Vec<Control>>,
    control_ready: tokio::sync::Notify,
    pending: Mutex<HashMap<u64, Awaited>>,
    /// Its open connections (our link to it, its link to us), closed when it stops being a
    /// member or its certificate is revoked.
    connections: Mutex<Vec<quinn::Connection>>,
    stop: watch::Sender<bool>,
}

impl Peer {
    fn new(node_id: u64, quic_addr: String, settings: &ForwardSettings) -> Peer {
        Peer {
            node_id,
            quic_addr,
            queue: PeerQueue::new(settings.queue_messages),
            routes: RwLock::new(RouteTable::default()),
            routes_known: AtomicBool::new(false),
            routes_applied: watch::channel(0).0,
            incarnation: AtomicU64::new(0),
            delivered: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            replay_dropped: AtomicU64::new(0),
            control: Mutex::new(Vec::new()),
            control_ready: tokio::sync::Notify::new(),
            pending: Mutex::new(HashMap::new()),
            connections: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        }
    }

    /// Keeps `connection` so it can be closed when the peer loses its standing.
    fn opened(&self, connection: &quinn::Connection) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|c| c.close_reason().is_none());
        connections.push(connection.clone());
    }

    /// Closes its open connections whose certificate no longer passes (all of them when `reason`
    /// is given).
    fn recheck(&self, auth: &AuthStore, reason: Option<&str>) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|connection| {
            let refused = reason.map(str::to_string).or_else(|| check_peer(connection, self.node_id, auth).err());
            if let Some(refused) = &refused {
                tracing::warn!(peer = self.node_id, reason = %refused, "forwarding connection closed");
                connection.close(2u32.into(), refused.as_bytes());
            }
            refused.is_none() && connection.close_reason().is_none()
        });
    }

    /// Sends a claim (or a move's tail request) on our link; the answer comes through the
    /// returned channels, the outcome first and then, for an outcome with pieces, the parts
    /// (each closed if the link goes down first).
    fn claim(&self, request: u64, claim: Control) -> Answer {
        let (outcome, outcome_rx) = oneshot::channel();
        let (parts, parts_rx) = oneshot::channel();
        let awaited = Awaited { outcome: Some(outcome), parts: Vec::new(), assembled: parts };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(request, awaited);
        self.send_control(claim);
        Answer { outcome: outcome_rx, parts: parts_rx }
    }

    fn send_control(&self, control: Control) {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).push(control);
        self.control_ready.notify_one();
    }

    /// No answer to `request` is awaited any longer; a session released for it after all goes
    /// back to its node.
    fn forget(&self, request: u64) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request);
    }

    fn answered(&self, request: u64, outcome: ClaimOutcome) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get_mut(&request) {
            Some(awaited) => {
                let has_pieces = outcome.has_pieces();
                if let Some(answer) = awaited.outcome.take() {
                    let _ = answer.send(outcome);
                }
                if !has_pieces {
                    pending.remove(&request);
                }
            }
            None => {
                drop(pending);
                if let ClaimOutcome::Released(Some(released)) = outcome {
                    tracing::info!(peer = self.node_id, client_id = %released.client_id, "a session released after its claim was given up goes back");
                    self.send_control(Control::MoveSettled { client_id: released.client_id, installed: false });
                }
            }
        }
    }

    fn piece(&self, request: u64, parts: Vec<MovedPart>, last: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(awaited) = pending.get_mut(&request) else { return };
        awaited.parts.extend(parts);
        if last {
            if let Some(awaited) = pending.remove(&request) {
                let _ = awaited.assembled.send(awaited.parts);
            }
        }
    }
}

/// An answer awaited from a peer: its outcome, then the parts that follow it in pieces.
#[derive(Debug)]
struct Awaited {
    outcome: Option<oneshot::Sender<ClaimOutcome>>,
    parts: Vec<MovedPart>,
    assembled: oneshot::Sender<Vec<MovedPart>>,
}

/// Where the answer to a claim arrives.
struct Answer {
    outcome: oneshot::Receiver<ClaimOutcome>,
    parts: oneshot::Receiver<Vec<MovedPart>>,
}

/// The forwarding plane of this node.
pub struct Forwarder {
    node_id: u64,
    /// Random per process start, so peers can tell a restart from a reconnect.
    incarnation: u64,
    broker: Broker,
    auth: Arc<AuthStore>,
    endpoint: quinn::Endpoint,
    settings: ForwardSettings,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    next_claim: AtomicU64,
    /// Turn of the round robin over peers for shared groups.
    next_shared: AtomicU64,
}

impl Forwarder {
    /// Binds the QUIC endpoint (`cluster.quic_bind`), accepts links from members, dials every
    /// member and connects the broker's publishes to the links.
    pub async fn start(
        settings: ForwardSettings,
        broker: Broker,
        cluster: Arc<Cluster>,
        auth: Arc<AuthStore>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Forwarder>> {
        let endpoint = endpoint(&settings)?;
        let settings_node_id = settings.node_id;
        tracing::info!(addr = %endpoint.local_addr()?, node_id = settings.node_id, "forwarding port (QUIC)");
        let forwarder = Arc::new(Forwarder {
            node_id: settings.node_id,
            incarnation: rand_core::OsRng.next_u64(),
            broker: broker.clone(),
            auth,
            endpoint,
            settings,
            peers: RwLock::new(HashMap::new()),
            next_claim: AtomicU64::new(1),
            next_shared: AtomicU64::new(0),
        });
        broker.set_remote(forwarder.clone(), settings_node_id);
        tokio::spawn(inbound::accept(forwarder.clone(), cluster.clone(), shutdown.clone()));
        tokio::spawn(follow_membership(forwarder.clone(), cluster, shutdown));
        Ok(forwarder)
    }

    fn peer(&self, node_id: u64) -> Option<Arc<Peer>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).get(&node_id).cloned()
    }

    /// Link state per peer, for metrics.
    pub fn link_gauges(&self) -> Vec<LinkGauge> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let mut gauges: Vec<LinkGauge> = (peers.values())
            .map(|p| LinkGauge {
                peer: p.node_id,
                up: p.up.load(Ordering::Relaxed),
                queued: p.queue.len(),
                forwarded: p.forwarded.load(Ordering::Relaxed),
                dropped: p.queue.dropped.load(Ordering::Relaxed) + p.replay_dropped.load(Ordering::Relaxed),
                routes: p.routes.read().unwrap_or_else(|e| e.into_inner()).len(),
            })
            .collect();
        gauges.sort_by_key(|g| g.peer);
        gauges
    }
}

impl Forwarder {
    /// One of `candidates` (keyed as given), round robin, among those with a live link if any.
    fn pick<'a, K: Copy>(&self, candidates: impl Iterator<Item = (K, &'a Peer)> + Clone) -> K {
        let turn = self.next_shared.fetch_add(1, Ordering::Relaxed) as usize;
        let up: Vec<K> = candidates.clone().filter(|(_, p)| p.up.load(Ordering::Relaxed)).map(|(k, _)| k).collect();
        let pool = if up.is_empty() { candidates.map(|(k, _)| k).collect() } else { up };
        pool[turn % pool.len()]
    }

    /// Passes a message on to another node (not `origin`) with members of the shared group
    /// `group`, which has none here (any longer) or none that took it; once: a message passed on
    /// is not passed on again. Returns false when no other node has members.
    fn pass_on(&self, message: &Arc<Message>, group: String, origin: u64) -> bool {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let candidates =
            peers.values().filter(|p| p.node_id != origin && p.routes.read().unwrap_or_else(|e| e.into_inner()).has_group(&group));
        let candidates: Vec<&Arc<Peer>> = candidates.collect();
        if candidates.is_empty() {
            return false;
        }
        let chosen = self.pick(candidates.iter().map(|p| (*p, p.as_ref())));
        let recipients = Recipients { subscribers: false, shared: vec![group], redispatched: true };
        chosen.queue.push(Outgoing { message: message.clone(), retained: None, recipients, acks: None });
        true
    }

    /// How long an old node keeps a moving session without hearing from the new node before it
    /// takes the session back: the new node receives it (a claim timeout, then the transfer),
    /// attaches, waits for its routes (a claim timeout) and asks for the tail; asked for the
    /// tail, the old node waits as long again for the settlement.
    fn move_abandon_after(&self) -> Duration {
        self.transfer_timeout() + self.settings.claim_timeout * 4 + MOVE_LINGER
    }

    /// Completes once every peer with a live link has applied our routes as of `version`, or
    /// after `timeout`; returns whether they all did.
    async fn routes_applied(&self, version: u64, timeout: Duration) -> bool {
        let waiting: Vec<watch::Receiver<u64>> = {
            let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
            peers.values().filter(|p| p.up.load(Ordering::Relaxed)).map(|p| p.routes_applied.subscribe()).collect()
        };
        let applied = waiting.into_iter().map(|mut applied| async move {
            let _ = applied.wait_for(|&applied| applied >= version).await;
        });
        tokio::time::timeout(timeout, futures_util::future::join_all(applied)).await.is_ok()
    }

    /// How long the parts of a session (or tail) may take to arrive after its outcome.
    fn transfer_timeout(&self) -> Duration {
        self.settings.claim_timeout * 4
    }

    /// Phase two of a session move; see [`Remote::complete_move`].
    async fn collect_tail(&self, from: u64, client_id: &str, version: u64) -> Option<Vec<MovedMessage>> {
        if !self.routes_applied(version, self.settings.claim_timeout).await {
            tracing::warn!(%client_id, "moved session: not every node confirmed its routes in time; collecting its tail anyway");
        }
        let Some(peer) = self.peer(from).filter(|p| p.up.load(Ordering::Relaxed)) else {
            tracing::warn!(%client_id, node = from, "moved session: its old node cannot be reached for the tail");
            return None;
        };
        let request = self.next_claim.fetch_add(1, Ordering::Relaxed);
        let answer = peer.claim(request, Control::MoveDone { request, client_id: client_id.into() });
        let tail = async {
            match tokio::time::timeout(self.settings.claim_timeout + MOVE_LINGER, answer.outcome).await {
                Ok(Ok(ClaimOutcome::Tail)) => tokio::time::timeout(self.transfer_timeout(), answer.parts).await.ok()?.ok(),
                Ok(Ok(ClaimOutcome::Failed(reason))) => {
                    tracing::warn!(%client_id, node = from, %reason, "moved session: its old node has no tail");
                    None
                }
                _ => None,
            }
        };
        let Some(parts) = tail.await else {
            peer.forget(request);
            tracing::warn!(%client_id, node = from, "moved session: its old node did not send what it collected");
            return None;
        };
        Some(parts.into_iter().filter_map(|part| if let MovedPart::Queued(message) = part { Some(message) } else { None }).collect())
    }

    /// Asks every peer to give up `client_id`; see [`Remote::claim`].
    async fn claim_everywhere(&self, client_id: &str, owner: &Owner, clean_start: bool) -> Result<Vec<(u64, MovedSession)>, AttachError> {
        let peers: Vec<Arc<Peer>> = self.peers.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut unreachable = Vec::new();
        let mut asked = Vec::new();
        for peer in peers {
            if !peer.up.load(Ordering::Relaxed) {
                unreachable.push(peer.node_id);
                continue;
            }
            let request = self.next_claim.fetch_add(1, Ordering::Relaxed);
            let claim = Control::Claim { request, client_id: client_id.into(), owner: owner.clone(), clean_start };
            asked.push((peer.clone(), request, peer.claim(request, claim)));
        }
        let deadline = tokio::time::Instant::now() + self.settings.claim_timeout;
        let mut moved = Vec::new();
        let mut refused = None;
        for (peer, request, answer) in asked {
            match tokio::time::timeout_at(deadline, answer.outcome).await {
                Ok(Ok(ClaimOutcome::NotHere | ClaimOutcome::Released(None))) => {}
                Ok(Ok(ClaimOutcome::Released(Some(released)))) => match tokio::time::timeout(self.transfer_timeout(), answer.parts).await {
                    Ok(Ok(parts)) => moved.push((peer.node_id, MovedPart::join(released.session, parts))),
                    _ => {
                        tracing::warn!(peer = peer.node_id, %client_id, "a released session did not arrive whole; it goes back");
                        peer.forget(request);
                        peer.send_control(Control::MoveSettled { client_id: client_id.into(), installed: false });
                        unreachable.push(peer.node_id);
                    }
                },
                Ok(Ok(ClaimOutcome::Refused { owner: existing })) => refused = refused.or(Some(existing)),
                Ok(Ok(ClaimOutcome::Failed(reason))) => {
                    tracing::warn!(peer = peer.node_id, %client_id, %reason, "a node could not give up the client id");
                    unreachable.push(peer.node_id);
                }
                // A tail is no answer to a claim.
                Ok(Ok(ClaimOutcome::Tail)) | Ok(Err(_)) | Err(_) => {
                    peer.forget(request);
                    unreachable.push(peer.node_id);
                }
            }
        }
        let refusal = match refused {
            Some(existing) => Some(AttachError::NotOwner { owner: existing, requester: owner.clone() }),
            None if !unreachable.is_empty() && self.settings.refuse_when_unreachable => Some(AttachError::PeersUnreachable(unreachable)),
            None => {
                if !unreachable.is_empty() {
                    tracing::info!(%client_id, nodes = ?unreachable, "client id claimed without the nodes that did not answer");
                }
                None
            }
        };
        if let Some(refusal) = refusal {
            // What was released for this connection goes back where it was.
            for (from, _) in &moved {
                self.settle_move(*from, client_id, false);
            }
            return Err(refusal);
        }
        Ok(moved)
    }
}

impl Remote for Forwarder {
    fn claim<'a>(&'a self, client_id: &'a str, owner: &'a Owner, clean_start: bool) -> ClaimFuture<'a> {
        Box::pin(self.claim_everywhere(client_id, owner, clean_start))
    }

    /// Waits (up to `suback_barrier`) until every peer with a live link has applied our routes
    /// as of `version`; a peer whose link is down gets them in the snapshot when it reconnects.
    fn routes_announced(&self, version: u64) -> BarrierFuture<'_> {
        Box::pin(async move {
            let timeout = self.settings.suback_barrier;
            if !timeout.is_zero() && !self.routes_applied(version, timeout).await {
                crate::telemetry::metrics::suback_barrier_timed_out();
                tracing::debug!(version, "SUBACK sent before every peer confirmed the route (suback_barrier_timeout_ms)");
            }
        })
    }

    fn complete_move<'a>(&'a self, from: u64, client_id: &'a str, version: u64) -> TailFuture<'a> {
        Box::pin(self.collect_tail(from, client_id, version))
    }

    /// Sent on our link to `from` (when it is down, once it is up again; until then the old
    /// node's own deadline gives the session back if it was not installed).
    fn settle_move(&self, from: u64, client_id: &str, installed: bool) {
        match self.peer(from) {
            Some(peer) => peer.send_control(Control::MoveSettled { client_id: client_id.into(), installed }),
            None => tracing::warn!(%client_id, node = from, installed, "a session move is not settled: its old node is no longer a member"),
        }
    }

    /// Queues the message for every peer with a matching route; a retained message goes to
    /// every peer, so each node's retained store holds it. Each matching shared group without a
    /// member here gets it through one peer with members (round robin, peers with a live link
    /// first).
    /// Under the `cluster` PUBACK policy, a QoS 1/2 message's publisher waits for the peers with
    /// a live link it went to.
    /// A live peer whose queue is full makes the publisher wait for room, as a slow local
    /// subscriber does (up to `limits.slow_subscriber_timeout_ms`).
    fn forward(&self, message: &Arc<Message>, retained: Option<Stamp>) -> Forwarding {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let waits = !self.settings.puback_cluster.is_zero() && message.qos != mqttbytes::QoS::AtMostOnce;
        // Each peer, whom the message is for there, and whether the publisher waits for it.
        let mut recipients: Vec<(&Arc<Peer>, Recipients, bool)> = Vec::with_capacity(peers.len());
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for peer in peers.values() {
            let routes = peer.routes.read().unwrap_or_else(|p| p.into_inner());
            routes.matching_groups(&message.topic, |group| {
                if !self.broker.has_local_route(group) {
                    match groups.iter_mut().find(|(g, _)| g == group) {
                        Some((_, candidates)) => candidates.push(recipients.len()),
                        None => groups.push((group.to_string(), vec![recipients.len()])),
                    }
                }
            });
            let subscribers = message.retain || !peer.routes_known.load(Ordering::Relaxed) || routes.matches(&message.topic);
            recipients.push((peer, Recipients { subscribers, ..Recipients::default() }, waits && peer.up.load(Ordering::Relaxed)));
        }
        for (group, candidates) in groups {
            let chosen = self.pick(candidates.iter().map(|&i| (i, recipients[i].0.as_ref())));
            recipients[chosen].1.shared.push(group);
        }
        recipients.retain(|(_, r, _)| r.subscribers || !r.shared.is_empty());
        let count = recipients.iter().filter(|(_, _, waited)| *waited).count();
        let acks = (count > 0).then(|| Arc::new(RemoteAcks::new(count)));
        let mut full: Vec<(Arc<Peer>, Outgoing)> = Vec::new();
        for (peer, recipients, waited) in recipients {
            let acks = acks.clone().filter(|_| waited);
            let outgoing = Outgoing { message: message.clone(), retained, recipients, acks };
            if let Err(outgoing) = peer.queue.try_push(outgoing, peer.up.load(Ordering::Relaxed)) {
                full.push((peer.clone(), outgoing));
            }
        }
        let room = (!full.is_empty()).then(|| {
            let deadline = tokio::time::Instant::now() + self.settings.slow_peer_timeout;
            let waits = full.into_iter().map(move |(peer, outgoing)| async move {
                peer.queue.push_wait(outgoing, deadline, || peer.up.load(Ordering::Relaxed)).await;
            });
            Box::pin(async move {
                futures_util::future::join_all(waits).await;
            }) as BarrierFuture<'static>
        });
        Forwarding { room, acks }
    }

    fn redispatch(&self, message: &Arc<Message>, route: &str) -> bool {
        self.pass_on(message, route.to_string(), self.node_id)
    }

    fn wait_acks(&self, acks: Vec<Arc<RemoteAcks>>) -> BarrierFuture<'_> {
        Box::pin(async move {
            let all = futures_util::future::join_all(acks.iter().map(|acks| acks.all()));
            if tokio::time::timeout(self.settings.puback_cluster, all).await.is_err() {
                crate::telemetry::metrics::puback_cluster_timed_out();
                tracing::debug!("PUBACK sent before every peer acknowledged (puback_cluster_timeout_ms)");
            }
        })
    }
}

/// Starts a link for every member that has none and stops the links of removed members,
/// following the Raft membership.
async fn follow_membership(forwarder: Arc<Forwarder>, cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let mut membership = cluster.raft.metrics();
    let mut auth_changes = forwarder.auth.changes();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = membership.changed() => {}
            _ = auth_changes.changed() => {}
            _ = shutdown.changed() => break,
        }
        let members: HashMap<u64, String> =
            cluster.members().into_iter().filter(|(id, _, _)| *id != forwarder.node_id).map(|(id, node, _)| (id, node.quic_addr)).collect();
        let mut peers = forwarder.peers.write().unwrap_or_else(|p| p.into_inner());
        peers.retain(|id, peer| {
            let keep = members.get(id).is_some_and(|addr| *addr == peer.quic_addr);
            if !keep {
                tracing::info!(peer = id, "forwarding link closed: no longer a member (or moved)");
                peer.stop.send_replace(true);
            }
            // A revoked certificate loses its connections at once; a removed member all of them.
            peer.recheck(&forwarder.auth, (!keep).then_some("no longer a member of this cluster"));
            keep
        });
        for (id, addr) in members {
            if peers.contains_key(&id) {
                continue;
            }
            if addr.is_empty() {
                tracing::warn!(peer = id, "member has no quic_addr: messages are not forwarded to it");
                continue;
            }
            let peer = Arc::new(Peer::new(id, addr, &forwarder.settings));
            peers.insert(id, peer.clone());
            tokio::spawn(link::run(forwarder.clone(), peer));
        }
    }
    for peer in forwarder.peers.read().unwrap_or_else(|p| p.into_inner()).values() {
        peer.stop.send_replace(true);
    }
    forwarder.endpoint.close(0u32.into(), b"shutting down");
}

/// The QUIC endpoint: accepts and dials with this node's certificate; peers must present a
/// certificate from the cluster CA (their role and revocation are checked once connected).
fn endpoint(settings: &ForwardSettings) -> anyhow::Result<quinn::Endpoint> {
    let certs = crate::tls::load_certs(&settings.cert_file)?;
    let key = crate::tls::load_key(&settings.key_file)?;
    let mut roots = RootCertStore::empty();
    for ca in crate::tls::load_certs(&settings.ca_file)? {
        roots.add(ca).map_err(|e| anyhow::anyhow!("{}: {e}", settings.ca_file.display()))?;
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder(roots.clone()).build().map_err(|e| anyhow::anyhow!("cluster.ca_file: {e}"))?;
    let mut server_tls =
        rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs.clone(), key.clone_key())?;
    server_tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let mut client_tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(certs, key)?;
    client_tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(settings.idle_timeout / 4));
    transport.max_idle_timeout(Some(settings.idle_timeout.try_into()?));
    transport.max_concurrent_uni_streams((u32::from(settings.streams) + 4).into());
    let transport = Arc::new(transport);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport);
    let mut endpoint =
        quinn::Endpoint::server(server, settings.bind).map_err(|e| anyhow::anyhow!("cluster.quic_bind {}: {e}", settings.bind))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The node certificate a link's peer presented, checked: OU `rampart-node`, not revoked, bound
/// to a node id.
fn peer_certificate(connection: &quinn::Connection, auth: &AuthStore) -> Result<NodeCertificate, String> {
    let chain = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .ok_or("no peer certificate")?;
    let leaf = chain.first().ok_or("empty peer certificate chain")?;
    crate::tls::caller::check_node(leaf, auth).map_err(|e| e.to_string())
}

/// As [`peer_certificate`], and the certificate is node `node_id`'s.
fn check_peer(connection: &quinn::Connection, node_id: u64, auth: &AuthStore) -> Result<(), String> {
    let node = peer_certificate(connection, auth)?;
    if node.node_id != node_id {
        return Err(format!("certificate {:?} is node {}'s, not node {node_id}'s", node.name, node.node_id));
    }
    Ok(())
}
