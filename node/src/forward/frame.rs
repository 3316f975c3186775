//! The wire format between nodes on a forwarding link: length-prefixed postcard frames. Pure.
//!
//! On a link's control stream (bidirectional) the dialling node sends [`Control`] frames and the
//! accepting node answers with [`Ack`]s; each of the link's publish streams (unidirectional)
//! starts with a [`StreamHeader`] and then carries [`Forwarded`] messages in order.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqttbytes::QoS;
use serde::{Deserialize, Serialize};

use crate::auth::policy::Owner;
use crate::broker::message::{Message, MessageId};
use crate::broker::persist::{MovedMessage, MovedSession, StoredInflight, StoredMessage, StoredOptions, StoredProperties, StoredSession};
use crate::broker::retained::{RetainedEntry, Stamp};

/// The ALPN protocol of a forwarding link; a peer speaking another version is refused.
pub const ALPN: &[u8] = b"rampart-fwd/5";

/// Largest frame a node sends or accepts. No frame is built over it: a message that would not
/// fit is refused (see [`crate::config::MAX_CLUSTERED_PACKET_SIZE`]) and big state travels in
/// pieces of [`CHUNK_BYTES`].
pub const MAX_FRAME: usize = 16 << 20;

/// Room a message's frame may need beside the MQTT packet it came in (sequence, stamps, ids,
/// shared group names): a packet of `limits.max_packet_size` always fits in a frame.
const _: () = assert!(crate::config::MAX_CLUSTERED_PACKET_SIZE + (512 << 10) <= MAX_FRAME);

/// Bytes per frame of a transfer made in pieces (route tables, retained stores): small enough
/// that acknowledgements and claims get their turn on the control stream between pieces.
pub const CHUNK_BYTES: usize = 256 << 10;

/// From the dialling node, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// First frame: who dials. A new `incarnation` (a restart) resets the receiver's view.
    Hello { node_id: u64, incarnation: u64 },
    /// The first piece of the dialling node's route table: filters it has local subscribers
    /// for (replaces what was known; the rest follows as [`Control::RoutesAdded`]).
    Routes(Vec<String>),
    /// Filters that got their first local subscriber (or the next piece of the route table).
    RoutesAdded(Vec<String>),
    /// Filters that lost their last local subscriber.
    RoutesRemoved(Vec<String>),
    /// The routes sent so far are the dialling node's as of this version of its route table
    /// (answered by [`Reply::RoutesApplied`] once applied: the SUBACK barrier).
    RoutesThrough(u64),
    /// A piece of the dialling node's retained messages (and cleared topics), sent after each
    /// connect; the accepting node keeps those newer than its own.
    Retained(Vec<WireRetained>),
    /// A client of `owner` connects with `client_id` on the dialling node: the accepting node
    /// gives up its session of that client id (answered by [`Reply::Claimed`]).
    Claim { request: u64, client_id: String, owner: Owner, clean_start: bool },
    /// The session of `client_id` that moved to the dialling node is in place there and the
    /// other nodes route to it: the accepting node stops collecting messages for it and sends
    /// what it collected (answered by [`Reply::Claimed`] with [`ClaimOutcome::Tail`]).
    MoveDone { request: u64, client_id: String },
    /// The end of a move of `client_id` away from the accepting node: the dialling node holds the
    /// session and its tail (`installed`; the old copy can go), or could not take it (the
    /// accepting node takes its session back).
    MoveSettled { client_id: String, installed: bool },
}

/// From the accepting node, on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The answer to [`Control::Hello`]: the dialling node is accepted as the member it says.
    Welcome,
    Ack(Ack),
    /// The routes up to [`Control::RoutesThrough`] this version are applied.
    RoutesApplied(u64),
    Claimed {
        request: u64,
        outcome: ClaimOutcome,
    },
    /// A piece of the session (or tail) a [`Reply::Claimed`] announced; `last` ends it.
    MovePiece {
        request: u64,
        parts: Vec<MovedPart>,
        last: bool,
    },
}

/// How a node answered a [`Control::Claim`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClaimOutcome {
    /// It holds no live session of that client id.
    NotHere,
    /// Its session belongs to another principal.
    Refused { owner: Owner },
    /// Its connection is gone and its session is on its way, unless clean start was asked or
    /// it was not persistent: the session's state here, its subscriptions, messages in flight
    /// and queued messages in [`Reply::MovePiece`]s. The old node keeps its copy until the move
    /// is settled ([`Control::MoveSettled`]).
    Released(Option<Box<ReleasedSession>>),
    /// It could not decide (the hand-over timed out), or has no session moving out.
    Failed(String),
    /// What it collected for a moved session since it released it (the answer to
    /// [`Control::MoveDone`]), in [`Reply::MovePiece`]s.
    Tail,
}

impl ClaimOutcome {
    /// Whether [`Reply::MovePiece`]s follow.
    pub fn has_pieces(&self) -> bool {
        matches!(self, ClaimOutcome::Released(Some(_)) | ClaimOutcome::Tail)
    }
}

/// The head of a released session: its client id, and its state without the parts that travel
/// in pieces (subscriptions, messages in flight).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleasedSession {
    pub client_id: String,
    pub session: StoredSession,
}

/// One part of a moving session, in a [`Reply::MovePiece`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MovedPart {
    Subscription(String, StoredOptions),
    Inflight(StoredInflight),
    Queued(MovedMessage),
}

impl MovedPart {
    /// About how many bytes it takes on the wire.
    pub fn wire_size(&self) -> usize {
        match self {
            MovedPart::Subscription(filter, _) => filter.len() + 16,
            MovedPart::Inflight(inflight) => inflight.message.as_ref().map_or(0, StoredMessage::wire_size) + 16,
            MovedPart::Queued(queued) => queued.message.wire_size() + 24,
        }
    }

    /// A session as its head and its parts (subscriptions, messages in flight, queued messages).
    pub fn split(client_id: &str, mut moved: MovedSession) -> (ReleasedSession, Vec<MovedPart>) {
        let subscriptions = std::mem::take(&mut moved.session.subscriptions).into_iter().map(|(f, o)| MovedPart::Subscription(f, o));
        let inflight = std::mem::take(&mut moved.session.inflight).into_iter().map(MovedPart::Inflight);
        let parts = subscriptions.chain(inflight).chain(moved.queued.into_iter().map(MovedPart::Queued)).collect();
        (ReleasedSession { client_id: client_id.into(), session: moved.session }, parts)
    }

    /// The session again from its head and parts (in the order [`MovedPart::split`] gave them).
    pub fn join(mut session: StoredSession, parts: Vec<MovedPart>) -> MovedSession {
        let mut queued = Vec::new();
        for part in parts {
            match part {
                MovedPart::Subscription(filter, options) => session.subscriptions.push((filter, options)),
                MovedPart::Inflight(inflight) => session.inflight.push(inflight),
                MovedPart::Queued(message) => queued.push(message),
            }
        }
        MovedSession { session, queued }
    }
}

/// Every message of publish stream `stream` up to `sequence` is queued for the accepting node's
/// local subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub stream: u8,
    pub sequence: u64,
}

/// First frame of a publish stream: its index in the link's pool of streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    pub stream: u8,
}

/// A topic of a retained store on the wire: its message (`None`: cleared) and stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRetained {
    pub topic: String,
    pub stamp: Stamp,
    pub message: Option<Forwarded<'static>>,
}

impl WireRetained {
    /// About how many bytes it takes on the wire.
    pub fn wire_size(&self) -> usize {
        self.topic.len() + self.message.as_ref().map_or(0, Forwarded::wire_size) + 32
    }

    pub fn new(entry: &RetainedEntry, now: Instant) -> WireRetained {
        WireRetained {
            topic: entry.topic.clone(),
            stamp: entry.stamp,
            message: entry.message.as_ref().map(|m| Forwarded::new(0, m, None, Recipients::SUBSCRIBERS, now).into_owned()),
        }
    }

    pub fn into_entry(self, now: Instant) -> RetainedEntry {
        RetainedEntry { topic: self.topic, stamp: self.stamp, message: self.message.map(|m| m.into_message(now)) }
    }
}

/// Whom a forwarded message is for on the receiving node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipients {
    /// Its local subscribers whose filters match.
    pub subscribers: bool,
    /// Shared groups (`$share/<group>/<filter>`) the publishing node chose it for: one member
    /// of each gets the message.
    pub shared: Vec<String>,
    /// Already passed on once by a node whose group had no member left; not passed on again.
    pub redispatched: bool,
}

impl Recipients {
    /// The receiving node's subscribers only.
    pub const SUBSCRIBERS: Recipients = Recipients { subscribers: true, shared: Vec::new(), redispatched: false };
}

/// One published message crossing the link, numbered per stream. The sending node encodes it
/// with the topic borrowed from its message; a decoded one owns its topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded<'a> {
    pub sequence: u64,
    pub topic: Cow<'a, str>,
    /// Serialized as one byte string (the same bytes postcard writes for a `Vec<u8>`).
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds the message has left to live (MQTT 5 Message Expiry Interval).
    pub expires_in_ms: Option<u64>,
    pub properties: StoredProperties,
    /// The stamp of a retained message in its node's retained store.
    pub retained_stamp: Option<Stamp>,
    pub recipients: Recipients,
    /// The message's identity, kept across nodes.
    pub id: Option<MessageId>,
}

fn qos_of(n: u8) -> QoS {
    match n {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

impl<'a> Forwarded<'a> {
    pub fn new(sequence: u64, m: &'a Message, retained_stamp: Option<Stamp>, recipients: Recipients, now: Instant) -> Forwarded<'a> {
        Forwarded {
            sequence,
            topic: Cow::Borrowed(&m.topic),
            payload: m.payload.clone(),
            qos: m.qos as u8,
            retain: m.retain,
            expires_in_ms: m.expires_at.map(|at| at.saturating_duration_since(now).as_millis() as u64),
            properties: StoredProperties::capture(m.properties.as_ref()),
            retained_stamp,
            recipients,
            id: m.id,
        }
    }

    pub fn qos(&self) -> QoS {
        qos_of(self.qos)
    }

    /// The same message, owning its topic.
    pub fn into_owned(self) -> Forwarded<'static> {
        let Forwarded { sequence, topic, payload, qos, retain, expires_in_ms, properties, retained_stamp, recipients, id } = self;
        let topic = Cow::Owned(topic.into_owned());
        Forwarded { sequence, topic, payload, qos, retain, expires_in_ms, properties, retained_stamp, recipients, id }
    }

    /// About how many bytes it takes on the wire.
    pub fn wire_size(&self) -> usize {
        let groups: usize = self.recipients.shared.iter().map(|g| g.len() + 2).sum();
        self.topic.len() + self.payload.len() + self.properties.wire_size() + groups + 64
    }

    /// The message as the receiving node routes it.
    pub fn into_message(self, now: Instant) -> Arc<Message> {
        Arc::new(Message {
            topic: self.topic.into_owned(),
            payload: self.payload,
            qos: qos_of(self.qos),
            retain: self.retain,
            properties: self.properties.into_properties(),
            expires_at: self.expires_in_ms.map(|ms| now + Duration::from_millis(ms)),
            publisher: None,
            id: self.id,
        })
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// Appends `frame`, length-prefixed, to `out` (serialized in place, without a copy); a frame
/// over [`MAX_FRAME`] is not appended.
pub fn encode<T: Serialize>(frame: &T, out: &mut BytesMut) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u32(0);
    postcard::serialize_with_flavor(frame, Appending(out)).expect("frames always encode");
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Splits `items` into pieces of about [`CHUNK_BYTES`] by their `size` (an item larger than that
/// travels alone); no piece when there are no items.
pub fn pieces<T>(items: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut pieces: Vec<Vec<T>> = Vec::new();
    let mut filled = 0;
    for item in items {
        let bytes = size(&item);
        match pieces.last_mut() {
            Some(piece) if filled + bytes <= CHUNK_BYTES => piece.push(item),
            _ => {
                pieces.push(vec![item]);
                filled = 0;
            }
        }
        filled += bytes;
    }
    pieces
}

/// postcard's output appended to a buffer.
struct Appending<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for Appending<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.put_u8(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Takes one complete frame off the front of `input`, if there is one.
pub fn decode<T: for<'de> Deserialize<'de>>(input: &mut BytesMut) -> Result<Option<T>, FrameError> {
    if input.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if input.len() < 4 + len {
        return Ok(None);
    }
    input.advance(4);
    let body = input.split_to(len);
    postcard::from_bytes(&body).map(Some).map_err(|e| FrameError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttbytes::v5::PublishProperties;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut out = BytesMut::new();
        let hello = Control::Hello { node_id: 2, incarnation: 77 };
        encode(&hello, &mut out).unwrap();
        encode(&Control::Routes(vec!["a/+".into(), "b/#".into()]), &mut out).unwrap();
        let mut input = out.split_to(3);
        assert_eq!(decode::<Control>(&mut input), Ok(None));
        input.extend_from_slice(&out);
        assert_eq!(decode::<Control>(&mut input), Ok(Some(hello)));
        assert_eq!(decode::<Control>(&mut input), Ok(Some(Control::Routes(vec!["a/+".into(), "b/#".into()]))));
        assert_eq!(decode::<Control>(&mut input), Ok(None));
    }

    #[test]
    fn a_message_keeps_its_properties_and_remaining_lifetime() {
        let now = Instant::now();
        let message = Message {
            topic: "t/1".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                topic_alias: None,
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
                subscription_identifiers: Vec::new(),
                content_type: Some("text/plain".into()),
            }),
            expires_at: Some(now + Duration::from_secs(30)),
            publisher: Some(4),
            id: None,
        };
        let mut out = BytesMut::new();
        encode(&Forwarded::new(9, &message, None, Recipients::SUBSCRIBERS, now), &mut out).unwrap();
        let back: Forwarded<'static> = decode(&mut out).unwrap().unwrap();
        assert_eq!((back.sequence, back.qos()), (9, QoS::AtLeastOnce));
        let copy = back.into_message(now);
        assert_eq!((copy.topic.as_str(), copy.retain, &copy.properties), ("t/1", true, &message.properties));
        assert_eq!(copy.expires_at, Some(now + Duration::from_secs(30)));
        assert_eq!(copy.publisher, None, "No Local is about local sessions only");
    }

    #[test]
    fn no_frame_is_built_over_the_limit_and_the_buffer_keeps_what_it_had() {
        let mut out = BytesMut::new();
        encode(&Control::RoutesThrough(1), &mut out).unwrap();
        let before = out.clone();
        let huge = Control::Routes(vec!["x".repeat(MAX_FRAME)]);
        assert!(matches!(encode(&huge, &mut out), Err(FrameError::TooLarge(n)) if n > MAX_FRAME));
        assert_eq!(out, before);
    }

    #[test]
    fn pieces_stay_within_the_chunk_size_and_keep_every_item_in_order() {
        let sizes = [CHUNK_BYTES / 2, CHUNK_BYTES / 2, 1, CHUNK_BYTES * 3, 5, 5];
        let pieces = pieces(sizes.iter().copied().enumerate(), |(_, size)| *size);
        let shape: Vec<Vec<usize>> = pieces.iter().map(|p| p.iter().map(|(i, _)| *i).collect()).collect();
        assert_eq!(shape, [vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        assert!(super::pieces(Vec::<u8>::new(), |_| 1).is_empty());
    }

    #[test]
    fn a_session_split_into_parts_travels_in_pieces_and_joins_again() {
        let options = StoredOptions { qos: 1, no_local: false, retain_as_published: false, subscription_id: None };
        let stored = |n: u8| StoredMessage {
            topic: format!("t/{n}"),
            payload: Bytes::from(vec![n; 100_000]),
            message_qos: 1,
            delivery_qos: 1,
            retain: false,
            subscription_ids: Vec::new(),
            expires_at: None,
            properties: StoredProperties::default(),
        };
        let session = StoredSession {
            owner: Owner::Anonymous,
            expiry_secs: 60,
            expires_at: 0,
            subscriptions: vec![("a/#".into(), options.clone()), ("b/+".into(), options)],
            inflight: vec![StoredInflight { packet_id: 7, sequence: 1, message: Some(stored(0)) }],
            awaiting_pubrel: vec![3],
        };
        let queued = (1..=20).map(|n| MovedMessage { id: None, message: stored(n) }).collect();
        let (head, parts) = MovedPart::split("c-1", MovedSession { session, queued });
        assert!(head.session.subscriptions.is_empty() && head.session.inflight.is_empty(), "they travel as parts");
        let pieces = pieces(parts, MovedPart::wire_size);
        assert!(pieces.len() > 5, "2 MB of queue in pieces of {CHUNK_BYTES} bytes");
        let mut wire = BytesMut::new();
        for parts in &pieces {
            encode(&Reply::MovePiece { request: 1, parts: parts.clone(), last: false }, &mut wire).unwrap();
            assert!(wire.len() <= 2 * CHUNK_BYTES, "a piece stays about the chunk size");
            wire.clear();
        }
        let moved = MovedPart::join(head.session, pieces.into_iter().flatten().collect());
        assert_eq!((head.client_id.as_str(), moved.session.awaiting_pubrel.as_slice()), ("c-1", &[3][..]));
        assert_eq!(moved.session.subscriptions.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), ["a/#", "b/+"]);
        assert_eq!(moved.session.inflight.len(), 1);
        assert_eq!(
            moved.queued.iter().map(|m| m.message.topic.clone()).collect::<Vec<_>>(),
            (1..=20).map(|n| format!("t/{n}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut huge = BytesMut::from(&((MAX_FRAME + 1) as u32).to_be_bytes()[..]);
        assert_eq!(decode::<Control>(&mut huge), Err(FrameError::TooLarge(MAX_FRAME + 1)));
        let mut garbage = BytesMut::from(&[0, 0, 0, 2, 0xFF, 0xFF][..]);
        assert!(matches!(decode::<Control>(&mut garbage), Err(FrameError::Decode(_))));
    }
}
