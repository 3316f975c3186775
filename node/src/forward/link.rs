//! The dialling side of a link to one peer: connects (and reconnects with backoff and jitter),
//! announces this node's routes (a snapshot, then changes), sends the peer's queued messages on
//! a pool of publish streams chosen by hash of topic, and keeps every QoS 1/2 message until the
//! peer acknowledges it — re-sending what is unacknowledged after a reconnect.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mqttbytes::QoS;
use rand_core::RngCore;
use tokio::io::AsyncReadExt;

use super::frame::{self, Ack, Control, Forwarded, Reply, StreamHeader, WireRetained};
use super::{check_peer, Forwarder, Peer};
use crate::broker::RemoteAcks;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Messages sent per wake-up before acknowledgements and route changes get a turn.
const BATCH: usize = 256;

/// A link that stays up this long resets the reconnect backoff; one that fails sooner (a peer
/// that accepts and then drops it) keeps backing off.
const STABLE_LINK: Duration = Duration::from_secs(10);

/// A message sent and not yet acknowledged: its sequence, its frame, and the publisher waiting
/// for the acknowledgement (PUBACK policy `cluster`).
type Unacked = (u64, Bytes, Option<Arc<RemoteAcks>>);

/// What survives reconnects: per publish stream, the next sequence number and the messages sent
/// but not acknowledged.
struct Outbox {
    sequences: Vec<u64>,
    unacked: Vec<VecDeque<Unacked>>,
    capacity: usize,
}

impl Outbox {
    fn new(streams: u8, capacity: usize) -> Outbox {
        Outbox { sequences: vec![0; streams.into()], unacked: vec![VecDeque::new(); streams.into()], capacity }
    }

    fn len(&self) -> usize {
        self.unacked.iter().map(VecDeque::len).sum()
    }

    /// Numbers a message for its stream, appends its frame to `out` and keeps a copy of the
    /// frame until acknowledged (QoS 1/2). Returns the error of a message that does not fit in
    /// a frame (`out` is left as it was); `dropped` is set when the replay budget forced the
    /// oldest unacknowledged message of that stream out (its publisher waits no longer).
    fn add<'m>(
        &mut self,
        stream: usize,
        forwarded: impl FnOnce(u64) -> Forwarded<'m>,
        (qos, acks): (QoS, Option<Arc<RemoteAcks>>),
        out: &mut BytesMut,
        dropped: &mut bool,
    ) -> Result<(), frame::FrameError> {
        let start = out.len();
        frame::encode(&forwarded(self.sequences[stream] + 1), out)?;
        self.sequences[stream] += 1;
        if qos != QoS::AtMostOnce {
            if self.len() >= self.capacity {
                let oldest = self.unacked[stream].pop_front();
                *dropped = oldest.is_some();
                if let Some((_, _, Some(acks))) = oldest {
                    acks.lost();
                }
            }
            self.unacked[stream].push_back((self.sequences[stream], Bytes::copy_from_slice(&out[start..]), acks));
        }
        Ok(())
    }

    fn acknowledge(&mut self, ack: Ack) {
        if let Some(unacked) = self.unacked.get_mut(usize::from(ack.stream)) {
            while unacked.front().is_some_and(|(seq, _, _)| *seq <= ack.sequence) {
                if let Some((_, _, Some(acks))) = unacked.pop_front() {
                    acks.acknowledged();
                }
            }
        }
    }
}

/// The stream a topic travels on (FNV-1a of the topic: cheap, and the same on every run).
fn stream_of(topic: &str, streams: usize) -> usize {
    let hash = topic.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3));
    (hash % streams as u64) as usize
}

/// Keeps a link to `peer` until the peer leaves the membership or the node stops.
pub async fn run(forwarder: Arc<Forwarder>, peer: Arc<Peer>) {
    let mut stop = peer.stop.subscribe();
    let mut outbox = Outbox::new(forwarder.settings.streams.max(1), forwarder.settings.replay_messages);
    let mut backoff = BACKOFF_MIN;
    while !*stop.borrow() {
        match connect(&forwarder, &peer).await {
            Ok(connection) => {
                let connected = Instant::now();
                let ended = serve(&forwarder, &peer, &connection, &mut outbox, &mut stop).await;
                let was_up = peer.up.swap(false, Ordering::Relaxed);
                // Publishers waiting for room with this peer wait no longer.
                peer.queue.release_waiting();
                if connected.elapsed() >= STABLE_LINK {
                    backoff = BACKOFF_MIN;
                }
                // Claims waiting for an answer on this link get none: their senders learn it now.
                peer.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
                connection.close(0u32.into(), b"link closed");
                if was_up {
                    tracing::info!(peer = peer.node_id, reason = %ended, unacknowledged = outbox.len(), "forwarding link down");
                } else {
                    // Refused before it was up: while a cluster forms, the peer does not know the
                    // membership yet; it is retried, and "forwarding link up" follows.
                    tracing::debug!(peer = peer.node_id, reason = %ended, "forwarding link not accepted yet");
                }
            }
            Err(e) => tracing::debug!(peer = peer.node_id, addr = %peer.quic_addr, error = %e, "forwarding link not connected"),
        }
        let jitter = Duration::from_millis(rand_core::OsRng.next_u64() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect(forwarder: &Forwarder, peer: &Peer) -> Result<quinn::Connection, String> {
    let addr = tokio::net::lookup_host(&peer.quic_addr).await.map_err(|e| e.to_string())?.next().ok_or("address did not resolve")?;
    let host = peer.quic_addr.rsplit_once(':').map_or(peer.quic_addr.as_str(), |(host, _)| host).trim_matches(['[', ']']);
    let connection = forwarder.endpoint.connect(addr, host).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
    check_peer(&connection, peer.node_id, &forwarder.auth).map_err(|e| {
        connection.close(1u32.into(), b"not the node certificate of the member dialled");
        format!("peer refused: {e}")
    })?;
    peer.opened(&connection);
    Ok(connection)
}

/// Runs one connected link until it fails or the peer is stopped; returns why it ended.
async fn serve(
    forwarder: &Forwarder,
    peer: &Peer,
    connection: &quinn::Connection,
    outbox: &mut Outbox,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> String {
    match serve_inner(forwarder, peer, connection, outbox, stop).await {
        Ok(()) => "stopped".into(),
        Err(e) => e,
    }
}

/// Writes `frames` to `stream`, a piece of about [`frame::CHUNK_BYTES`] at a time.
async fn write_frames(stream: &mut quinn::SendStream, frames: impl IntoIterator<Item = Control>) -> Result<(), String> {
    let mut out = BytesMut::new();
    for control in frames {
        frame::encode(&control, &mut out).map_err(|e| e.to_string())?;
        if out.len() >= frame::CHUNK_BYTES {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
    }
    stream.write_all(&out).await.map_err(|e| e.to_string())
}

/// Route changes as frames: the filters added, then those removed, in pieces.
fn route_frames(added: Vec<String>, removed: Vec<String>) -> impl Iterator<Item = Control> {
    let size = |filter: &String| filter.len() + 4;
    let added = frame::pieces(added, size).into_iter().map(Control::RoutesAdded);
    added.chain(frame::pieces(removed, size).into_iter().map(Control::RoutesRemoved))
}

/// Waits for the peer's answer to our `Hello`: it accepted us as the member we are.
async fn welcomed(replies: &mut quinn::RecvStream, input: &mut BytesMut, wait: Duration) -> Result<(), String> {
    let read = async {
        loop {
            if let Some(reply) = frame::decode::<Reply>(input).map_err(|e| e.to_string())? {
                return match reply {
                    Reply::Welcome => Ok(()),
                    other => Err(format!("expected Welcome, got {other:?}")),
                };
            }
            if replies.read_buf(input).await.map_err(|e| e.to_string())? == 0 {
                return Err("the peer closed the link before accepting it".to_string());
            }
        }
    };
    tokio::time::timeout(wait, read).await.map_err(|_| format!("no answer to Hello within {wait:?}"))?
}

async fn serve_inner(
    forwarder: &Forwarder,
    peer: &Peer,
    connection: &quinn::Connection,
    outbox: &mut Outbox,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| e.to_string();
    let (mut control, mut acks) = connection.open_bi().await.map_err(|e| failed(&e))?;
    let mut ack_input = BytesMut::new();
    write_frames(&mut control, [Control::Hello { node_id: forwarder.node_id, incarnation: forwarder.incarnation }]).await?;
    welcomed(&mut acks, &mut ack_input, forwarder.settings.idle_timeout).await?;
    tracing::info!(peer = peer.node_id, addr = %peer.quic_addr, "forwarding link up");
    peer.up.store(true, Ordering::Relaxed);
    let mut routes = forwarder.broker.route_changes();
    let version = *routes.borrow_and_update();
    let mut announced: HashSet<String> = forwarder.broker.local_routes().into_iter().collect();
    let mut table = frame::pieces(announced.iter().cloned(), |filter| filter.len() + 4).into_iter();
    let first = Control::Routes(table.next().unwrap_or_default());
    let table = std::iter::once(first).chain(table.map(Control::RoutesAdded));
    write_frames(&mut control, table.chain([Control::RoutesThrough(version)])).await?;
    // The retained store, so the peer converges with it after a partition (newest stamp wins).
    let now = Instant::now();
    let retained = forwarder.broker.retained_entries().iter().map(|e| WireRetained::new(e, now)).collect::<Vec<_>>();
    write_frames(&mut control, frame::pieces(retained, WireRetained::wire_size).into_iter().map(Control::Retained)).await?;
    let mut streams = Vec::with_capacity(outbox.unacked.len());
    for (index, unacked) in outbox.unacked.iter().enumerate() {
        let mut stream = connection.open_uni().await.map_err(|e| failed(&e))?;
        let mut header = BytesMut::new();
        frame::encode(&StreamHeader { stream: index as u8 }, &mut header).map_err(|e| failed(&e))?;
        stream.write_all(&header).await.map_err(|e| failed(&e))?;
        // What the peer has not acknowledged goes again; it drops what it already delivered.
        for (_, bytes, _) in unacked {
            stream.write_all(bytes).await.map_err(|e| failed(&e))?;
        }
        streams.push(stream);
    }
    let mut batches = vec![BytesMut::new(); streams.len()];
    let mut popped = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            closed = connection.closed() => return Err(closed.to_string()),
            _ = routes.changed() => {
                let version = *routes.borrow_and_update();
                let current: HashSet<String> = forwarder.broker.local_routes().into_iter().collect();
                let added = current.difference(&announced).cloned().collect();
                let removed = announced.difference(&current).cloned().collect();
                announced = current;
                write_frames(&mut control, route_frames(added, removed).chain([Control::RoutesThrough(version)])).await?;
            }
            read = acks.read_buf(&mut ack_input) => {
                if read.map_err(|e| failed(&e))? == 0 {
                    return Err("the peer closed the control stream".into());
                }
                while let Some(reply) = frame::decode::<Reply>(&mut ack_input).map_err(|e| failed(&e))? {
                    match reply {
                        Reply::Ack(ack) => outbox.acknowledge(ack),
                        Reply::RoutesApplied(version) => {
                            peer.routes_applied.send_if_modified(|applied| std::mem::replace(applied, version.max(*applied)) < version);
                        }
                        Reply::Claimed { request, outcome } => peer.answered(request, outcome),
                        Reply::MovePiece { request, parts, last } => peer.piece(request, parts, last),
                        Reply::Welcome => return Err("a second Welcome".into()),
                    }
                }
            }
            _ = peer.control_ready.notified() => {
                let frames = std::mem::take(&mut *peer.control.lock().unwrap_or_else(|p| p.into_inner()));
                write_frames(&mut control, frames).await?;
            }
            _ = peer.queue.readable() => {
                // One write per publish stream for the whole batch.
                let now = Instant::now();
                peer.queue.pop_into(&mut popped, BATCH);
                let mut sent = 0;
                for outgoing in popped.drain(..) {
                    let message = &outgoing.message;
                    let stream = stream_of(&message.topic, streams.len());
                    let mut dropped = false;
                    let forwarded = |seq| Forwarded::new(seq, message, outgoing.retained, outgoing.recipients.clone(), now);
                    if let Err(e) = outbox.add(stream, forwarded, (message.qos, outgoing.acks.clone()), &mut batches[stream], &mut dropped) {
                        tracing::warn!(peer = peer.node_id, topic = %message.topic, error = %e, "message not forwarded: it does not fit in a link frame");
                        crate::telemetry::metrics::dropped(crate::telemetry::metrics::DropReason::TooLargeForLink);
                        if let Some(acks) = &outgoing.acks {
                            acks.lost();
                        }
                        continue;
                    }
                    if dropped {
                        peer.replay_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    sent += 1;
                }
                peer.forwarded.fetch_add(sent, Ordering::Relaxed);
                for (stream, batch) in streams.iter_mut().zip(&mut batches) {
                    if !batch.is_empty() {
                        // Handed over whole: quinn keeps the buffer instead of copying it.
                        stream.write_chunk(batch.split().freeze()).await.map_err(|e| failed(&e))?;
                    }
                }
                if !peer.queue.is_empty() {
                    peer.queue.wake();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Message;

    fn forwarded(seq: u64) -> Forwarded<'static> {
        let message = Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            publisher: None,
            id: None,
        };
        Forwarded::new(seq, &message, None, frame::Recipients::SUBSCRIBERS, Instant::now()).into_owned()
    }

    #[test]
    fn a_message_pushed_out_of_the_replay_budget_is_lost_to_its_waiting_publisher() {
        let mut outbox = Outbox::new(1, 1);
        let (mut out, mut dropped) = (BytesMut::new(), false);
        let (first, second) = (Arc::new(RemoteAcks::new(1)), Arc::new(RemoteAcks::new(1)));
        outbox.add(0, forwarded, (QoS::AtLeastOnce, Some(first.clone())), &mut out, &mut dropped).unwrap();
        outbox.add(0, forwarded, (QoS::AtLeastOnce, Some(second.clone())), &mut out, &mut dropped).unwrap();
        assert!(dropped && first.is_lost(), "no peer holds it: its publisher is not told it is");
        outbox.acknowledge(Ack { stream: 0, sequence: 2 });
        assert!(!second.is_lost());
    }

    #[test]
    fn unacknowledged_messages_wait_for_their_ack_and_the_budget_is_kept() {
        let mut outbox = Outbox::new(2, 3);
        let (mut out, mut dropped) = (BytesMut::new(), false);
        for _ in 0..2 {
            outbox.add(0, forwarded, (QoS::AtLeastOnce, None), &mut out, &mut dropped).unwrap();
        }
        outbox.add(1, forwarded, (QoS::AtMostOnce, None), &mut out, &mut dropped).unwrap();
        let before = out.len();
        outbox.add(1, forwarded, (QoS::ExactlyOnce, None), &mut out, &mut dropped).unwrap();
        assert_eq!(outbox.unacked[1][0].1, out[before..], "the copy kept for a replay is the frame sent");
        assert_eq!(outbox.len(), 3, "QoS 0 is never kept");
        assert_eq!(outbox.sequences, [2, 2]);
        outbox.add(0, forwarded, (QoS::AtLeastOnce, None), &mut out, &mut dropped).unwrap();
        assert!(dropped, "past the budget the oldest of the stream goes");
        outbox.acknowledge(Ack { stream: 0, sequence: 3 });
        outbox.acknowledge(Ack { stream: 1, sequence: 1 });
        assert_eq!(outbox.len(), 1);
        outbox.acknowledge(Ack { stream: 9, sequence: 1 });
    }

    #[test]
    fn a_topic_always_takes_the_same_stream() {
        let first = stream_of("plant/line-1", 4);
        assert!((0..10).all(|_| stream_of("plant/line-1", 4) == first));
        assert!(first < 4);
    }
}
