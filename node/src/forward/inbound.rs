//! The accepting side of links: checks who dials (a node certificate, a current member), learns
//! the peer's routes and answers its client-id claims from its control stream, and routes each
//! forwarded message to the local sessions — in order per publish stream, skipping what a replay
//! repeats — acknowledging it once it is queued for every local subscriber (and on disk for
//! durable ones).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Semaphore};

use super::frame::{self, Ack, ClaimOutcome, Control, Forwarded, MovedPart, Reply, StreamHeader};
use super::routes::RouteTable;
use super::{peer_certificate, Forwarder, Peer};
use crate::cluster::Cluster;

/// Replies (acknowledgements, claim answers) waiting for the control stream; a full queue makes
/// the publish streams and the control stream wait (the peer then waits on flow control).
const REPLIES_WAITING: usize = 1024;

/// Claims and session-move completions of one link being handled at once; more wait their turn
/// on the control stream.
const CLAIMS_AT_ONCE: usize = 64;

/// Accepts links until the node stops.
pub async fn accept(forwarder: Arc<Forwarder>, cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            incoming = forwarder.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let (forwarder, cluster) = (forwarder.clone(), cluster.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = serve(&forwarder, &cluster, incoming).await {
                tracing::info!(%remote, error = %e, "inbound forwarding link ended");
            }
        });
    }
}

async fn serve(forwarder: &Arc<Forwarder>, cluster: &Cluster, incoming: quinn::Incoming) -> Result<(), String> {
    let connection = incoming.await.map_err(|e| e.to_string())?;
    let refuse = |reason: String| {
        connection.close(1u32.into(), reason.as_bytes());
        reason
    };
    let certified = peer_certificate(&connection, &forwarder.auth).map_err(|e| refuse(format!("refused: {e}")))?;
    let hello = tokio::time::timeout(forwarder.settings.idle_timeout, read_hello(&connection));
    let (ack_stream, control, input, (node_id, incarnation)) =
        hello.await.map_err(|_| refuse("no Hello in time".into()))?.map_err(&refuse)?;
    // The id a peer claims must be the one its certificate is bound to, and a current member's.
    if node_id != certified.node_id {
        return Err(refuse(format!(
            "certificate {:?} is node {}'s, but it claims to be node {node_id}",
            certified.name, certified.node_id
        )));
    }
    let member = cluster.members().iter().any(|(id, _, _)| *id == node_id) && node_id != forwarder.node_id;
    let Some(peer) = forwarder.peer(node_id).filter(|_| member) else {
        let reason = refuse(format!("node {node_id} is not a member of this cluster"));
        if cluster.members().is_empty() {
            // This node has not received the membership yet (the cluster is forming): the peer
            // retries, and "inbound forwarding link up" follows.
            tracing::debug!(peer = node_id, "inbound forwarding link refused until this node knows the membership");
            return Ok(());
        }
        return Err(reason);
    };
    peer.opened(&connection);
    if peer.incarnation.swap(incarnation, Ordering::Relaxed) != incarnation {
        // A restarted peer: what it delivered before means nothing now.
        peer.delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    tracing::info!(peer = node_id, remote = %connection.remote_address(), "inbound forwarding link up");
    let (replies, reply_rx) = mpsc::channel(REPLIES_WAITING);
    let _ = replies.send(Reply::Welcome).await;
    tokio::spawn(write_replies(ack_stream, reply_rx));
    let streams = {
        let (forwarder, peer, connection, replies) = (forwarder.clone(), peer.clone(), connection.clone(), replies.clone());
        tokio::spawn(async move {
            while let Ok(stream) = connection.accept_uni().await {
                let (forwarder, peer, replies) = (forwarder.clone(), peer.clone(), replies.clone());
                tokio::spawn(async move {
                    if let Err(e) = deliver_stream(&forwarder, &peer, incarnation, stream, replies).await {
                        tracing::debug!(peer = peer.node_id, error = %e, "publish stream ended");
                    }
                });
            }
        })
    };
    let result = read_control(forwarder, &peer, control, input, replies).await;
    streams.abort();
    result
}

/// Accepts the link's control stream and reads its first frame, the dialling node's `Hello`.
async fn read_hello(connection: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream, BytesMut, (u64, u64)), String> {
    let (ack_stream, mut control) = connection.accept_bi().await.map_err(|e| e.to_string())?;
    let mut input = BytesMut::new();
    loop {
        if let Some(hello) = frame::decode::<Control>(&mut input).map_err(|e| e.to_string())? {
            return match hello {
                Control::Hello { node_id, incarnation } => Ok((ack_stream, control, input, (node_id, incarnation))),
                other => Err(format!("expected Hello, got {other:?}")),
            };
        }
        if control.read_buf(&mut input).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before Hello".into());
        }
    }
}

/// Applies the peer's route announcements and answers its claims until the control stream ends.
async fn read_control(
    forwarder: &Arc<Forwarder>,
    peer: &Peer,
    mut control: quinn::RecvStream,
    mut input: BytesMut,
    replies: mpsc::Sender<Reply>,
) -> Result<(), String> {
    let claims = Arc::new(Semaphore::new(CLAIMS_AT_ONCE));
    loop {
        while let Some(frame) = frame::decode::<Control>(&mut input).map_err(|e| e.to_string())? {
            let routes = || peer.routes.write().unwrap_or_else(|p| p.into_inner());
            match frame {
                Control::Routes(filters) => *routes() = RouteTable::from_filters(filters.iter().map(String::as_str)),
                Control::RoutesAdded(filters) => filters.iter().for_each(|filter| routes().insert(filter)),
                Control::RoutesRemoved(filters) => filters.iter().for_each(|filter| routes().remove(filter)),
                Control::RoutesThrough(version) => {
                    peer.routes_known.store(true, Ordering::Relaxed);
                    let _ = replies.send(Reply::RoutesApplied(version)).await;
                }
                Control::Hello { .. } => return Err("a second Hello".into()),
                Control::Retained(entries) => {
                    let now = Instant::now();
                    forwarder.broker.merge_retained(entries.into_iter().map(|e| e.into_entry(now)).collect());
                }
                Control::Claim { request, client_id, owner, clean_start } => {
                    let (forwarder, replies, node) = (forwarder.clone(), replies.clone(), peer.node_id);
                    let turn = claims.clone().acquire_owned().await.map_err(|e| e.to_string())?;
                    tokio::spawn(async move {
                        let _turn = turn;
                        let abandon_after = forwarder.move_abandon_after();
                        let (outcome, parts) = match forwarder.broker.release(&client_id, &owner, clean_start, node, abandon_after).await {
                            Ok(None) => (ClaimOutcome::NotHere, None),
                            Ok(Some(moved)) => {
                                let (released, parts) = MovedPart::split(&client_id, moved);
                                (ClaimOutcome::Released(Some(Box::new(released))), Some(parts))
                            }
                            Err(crate::broker::AttachError::NotOwner { owner, .. }) => (ClaimOutcome::Refused { owner }, None),
                            Err(e) => (ClaimOutcome::Failed(e.to_string()), None),
                        };
                        answer(&replies, request, outcome, parts).await;
                    });
                }
                Control::MoveDone { request, client_id } => {
                    let (forwarder, replies, node) = (forwarder.clone(), replies.clone(), peer.node_id);
                    let turn = claims.clone().acquire_owned().await.map_err(|e| e.to_string())?;
                    tokio::spawn(async move {
                        let _turn = turn;
                        let abandon_after = forwarder.move_abandon_after();
                        match forwarder.broker.finish_move(&client_id, node, super::MOVE_LINGER, abandon_after).await {
                            Some(tail) => {
                                answer(&replies, request, ClaimOutcome::Tail, Some(tail.into_iter().map(MovedPart::Queued).collect())).await
                            }
                            None => {
                                answer(
                                    &replies,
                                    request,
                                    ClaimOutcome::Failed("no session of this client id is moving out here".into()),
                                    None,
                                )
                                .await
                            }
                        }
                    });
                }
                Control::MoveSettled { client_id, installed: true } => forwarder.broker.end_move(&client_id, peer.node_id),
                Control::MoveSettled { client_id, installed: false } => {
                    forwarder.broker.give_back(&client_id, peer.node_id, "the new node could not take it");
                }
            }
        }
        if control.read_buf(&mut input).await.map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
    }
}

/// Answers a claim (or a tail request): the outcome, then its parts in pieces of about
/// [`frame::CHUNK_BYTES`], through the bounded reply queue.
async fn answer(replies: &mpsc::Sender<Reply>, request: u64, outcome: ClaimOutcome, parts: Option<Vec<MovedPart>>) {
    if replies.send(Reply::Claimed { request, outcome }).await.is_err() {
        return;
    }
    let Some(parts) = parts else { return };
    let mut pieces = frame::pieces(parts, MovedPart::wire_size);
    let last = pieces.pop().unwrap_or_default();
    for parts in pieces {
        if replies.send(Reply::MovePiece { request, parts, last: false }).await.is_err() {
            return;
        }
    }
    let _ = replies.send(Reply::MovePiece { request, parts: last, last: true }).await;
}

/// Routes the messages of one publish stream to the local sessions, in order; after each read,
/// acknowledges (cumulatively) the QoS 1/2 messages it brought, once they are all queued.
async fn deliver_stream(
    forwarder: &Forwarder,
    peer: &Peer,
    incarnation: u64,
    mut stream: quinn::RecvStream,
    replies: mpsc::Sender<Reply>,
) -> Result<(), String> {
    let mut input = BytesMut::new();
    // The stream's index and the highest sequence delivered on it, once its header is read.
    let mut header: Option<(u8, Arc<AtomicU64>)> = None;
    loop {
        if header.is_none() {
            header = frame::decode::<StreamHeader>(&mut input).map_err(|e| e.to_string())?.map(|h| {
                let mut delivered = peer.delivered.lock().unwrap_or_else(|p| p.into_inner());
                (h.stream, delivered.entry((incarnation, h.stream)).or_default().clone())
            });
        }
        if let Some((index, delivered)) = &header {
            let mut acknowledge = None;
            while let Some(forwarded) = frame::decode::<Forwarded<'static>>(&mut input).map_err(|e| e.to_string())? {
                let sequence = forwarded.sequence;
                if forwarded.qos() != mqttbytes::QoS::AtMostOnce {
                    acknowledge = Some(sequence);
                }
                // A replay repeats what was delivered before the link broke: skipped, acknowledged.
                if delivered.fetch_max(sequence, Ordering::Relaxed) < sequence {
                    deliver(forwarder, peer, forwarded).await;
                }
            }
            if let Some(sequence) = acknowledge {
                let _ = replies.send(Reply::Ack(Ack { stream: *index, sequence })).await;
            }
        }
        if stream.read_buf(&mut input).await.map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
    }
}

/// Routes one forwarded message (not seen before) to the local sessions, waiting until it is
/// queued for each (and on disk for durable ones).
async fn deliver(forwarder: &Forwarder, peer: &Peer, forwarded: Forwarded<'static>) {
    let (stamp, recipients) = (forwarded.retained_stamp, forwarded.recipients.clone());
    let message = forwarded.into_message(Instant::now());
    let broker = &forwarder.broker;
    let (published, unserved) =
        broker.publish_forwarded(message.clone(), stamp, recipients.subscribers, &recipients.shared, recipients.redispatched).await;
    for group in unserved.into_iter().filter(|_| !recipients.redispatched) {
        if !forwarder.pass_on(&message, group.clone(), peer.node_id) {
            tracing::debug!(%group, topic = %message.topic, "shared group has no member left on any node: message not delivered to it");
            crate::telemetry::metrics::dropped(crate::telemetry::metrics::DropReason::SharedGroupGone);
        }
    }
    if let Some(ticket) = published.durable_ticket {
        broker.wait_durable(ticket).await;
    }
}

/// Writes acknowledgements and claim answers, together with those already waiting. Acks are
/// cumulative, so of those waiting only the last of each publish stream is sent.
async fn write_replies(mut stream: quinn::SendStream, mut replies: mpsc::Receiver<Reply>) {
    let mut out = BytesMut::new();
    let mut acks: Vec<Ack> = Vec::new();
    while let Some(first) = replies.recv().await {
        for reply in std::iter::once(first).chain(std::iter::from_fn(|| replies.try_recv().ok())) {
            match reply {
                Reply::Ack(ack) => match acks.iter_mut().find(|a| a.stream == ack.stream) {
                    Some(last) => last.sequence = last.sequence.max(ack.sequence),
                    None => acks.push(ack),
                },
                other => {
                    if let Err(e) = frame::encode(&other, &mut out) {
                        tracing::error!(error = %e, "reply not sent: it does not fit in a link frame");
                    }
                }
            }
        }
        for ack in acks.drain(..) {
            frame::encode(&Reply::Ack(ack), &mut out).expect("an ack is a few bytes");
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}
