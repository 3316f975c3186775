//! Bad input on raw sockets, MQTT 3.1.1 and 5.0: every malformed or forbidden packet gets its
//! exact answer (compared byte for byte) and then the socket is closed; the limits hold
//! (connections, connect timeout, packet size, Receive Maximum, slow subscribers, offline
//! queues), and nothing the broker acknowledged disappears without being counted.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Broker, Options, Raw};
use mqttbytes::{v5, QoS};
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::{self, V311, V5};

const VERSIONS: [ProtocolVersion; 2] = [V311, V5];

// MQTT 5 reason codes the broker answers with.
const MALFORMED: u8 = 0x81;
const PROTOCOL_ERROR: u8 = 0x82;
const TOPIC_NAME_INVALID: u8 = 0x90;
const PACKET_ID_NOT_FOUND: u8 = 0x92;
const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
const PACKET_TOO_LARGE: u8 = 0x95;

// First bytes of the fixed headers used here.
const PUBACK: u8 = 0x40;
const PUBREC: u8 = 0x50;
const PUBREL: u8 = 0x62;
const PUBCOMP: u8 = 0x70;
const PINGREQ: [u8; 2] = [0xC0, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];

fn broker(limits: &'static str) -> Broker {
    Broker::start(Options { limits, all_listeners: false })
}

fn name(version: ProtocolVersion) -> &'static str {
    match version {
        V311 => "v3",
        V5 => "v5",
    }
}

/// CONNECT with a 60 s keep alive. In MQTT 5 it asks for no reason strings (Request Problem
/// Information 0), so the broker's answers are short enough to compare byte for byte.
fn connect_packet(client_id: &str, clean: bool, session_expiry: Option<u32>) -> Packet {
    let mut connect = v5::Connect::new(client_id);
    connect.keep_alive = 60;
    connect.clean_session = clean;
    connect.properties = Some(v5::ConnectProperties {
        session_expiry_interval: session_expiry,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: Some(0),
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    });
    Packet::Connect(connect)
}

/// Sends `connect` on a new socket and asserts a successful CONNACK; returns the connection
/// and the CONNACK's session present flag.
fn open(addr: SocketAddr, version: ProtocolVersion, connect: &Packet) -> (Raw, bool) {
    let mut raw = Raw::socket(addr, version);
    raw.send_packet(connect);
    match raw.recv() {
        Some(Packet::ConnAck(ack)) if ack.code == v5::ConnectReturnCode::Success => (raw, ack.session_present),
        other => panic!("expected a successful CONNACK, got {other:?}"),
    }
}

/// A connection with a clean session.
fn connected(addr: SocketAddr, version: ProtocolVersion, client_id: &str) -> Raw {
    open(addr, version, &connect_packet(client_id, true, None)).0
}

fn publish_packet(topic: &str, qos: QoS, pkid: u16, payload: impl Into<Vec<u8>>) -> Packet {
    let mut publish = v5::Publish::new(topic, qos, payload);
    publish.pkid = pkid;
    Packet::Publish(publish)
}

/// A QoS 1 PUBLISH (packet id 1) of exactly `size` bytes, fixed header included.
fn publish_of_size(version: ProtocolVersion, size: usize) -> Packet {
    let packet = |payload_len| publish_packet("big", QoS::AtLeastOnce, 1, vec![b'x'; payload_len]);
    let encoded_len = |packet: &Packet| rampart_node::mqtt::codec::encode(version, packet, &mut bytes::BytesMut::new(), None).unwrap();
    // Without a payload the remaining length takes one byte; at `size` it takes two.
    let sized = packet(size - encoded_len(&packet(0)) - 1);
    assert_eq!(encoded_len(&sized), size);
    sized
}

/// Subscribes (packet id 1) and asserts the grant.
fn subscribe(c: &mut Raw, filter: &str, qos: QoS) {
    let mut subscribe = v5::Subscribe::new(filter, qos);
    subscribe.pkid = 1;
    c.send_packet(&Packet::Subscribe(subscribe));
    match c.recv() {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.return_codes.len(), 1, "{ack:?}"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// A packet written by hand: the first header byte, then the body parts; the remaining length
/// (under 128) is computed.
fn raw(byte1: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    assert!(body.len() < 128, "hand-written packets are short");
    let mut bytes = vec![byte1, body.len() as u8];
    bytes.extend_from_slice(&body);
    bytes
}

/// The empty property list MQTT 5 has where 3.1.1 has nothing.
fn no_properties(version: ProtocolVersion) -> &'static [u8] {
    match version {
        V311 => &[],
        V5 => &[0x00],
    }
}

/// A QoS 0 PUBLISH written by hand, so that its topic can be anything, valid or not.
fn raw_publish(version: ProtocolVersion, topic: &[u8]) -> Vec<u8> {
    raw(0x30, &[&[0x00, topic.len() as u8], topic, no_properties(version)])
}

/// An MQTT 5 QoS 0 PUBLISH with a Topic Alias property (0x23).
fn aliased_publish(topic: &[u8], alias: u16) -> Vec<u8> {
    let [high, low] = alias.to_be_bytes();
    raw(0x30, &[&[0x00, topic.len() as u8], topic, &[0x03, 0x23, high, low], b"payload"])
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP with success and no properties (the same in both versions).
fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [high, low] = pkid.to_be_bytes();
    vec![kind, 0x02, high, low]
}

fn expect_frame(c: &mut Raw, expected: &[u8], what: &str) {
    assert_eq!(c.recv_frame().as_deref(), Some(expected), "{what}: wrong answer");
}

fn expect_closed(c: &mut Raw, what: &str) {
    assert_eq!(c.recv_frame(), None, "{what}: the connection is still open");
}

/// The answer to a protocol violation: exactly DISCONNECT `reason` in MQTT 5 (nothing in 3.1.1,
/// which has no server DISCONNECT), then the close.
fn expect_refused(c: &mut Raw, reason: u8, what: &str) {
    expect_refused_with_one_of(c, &[reason], what);
}

/// [`expect_refused`] where the specification leaves a choice of reason codes.
fn expect_refused_with_one_of(c: &mut Raw, reasons: &[u8], what: &str) {
    if c.version == V5 {
        let answer = c.recv_frame();
        let expected: Vec<Vec<u8>> = reasons.iter().map(|&r| vec![0xE0, 0x01, r]).collect();
        assert!(answer.as_ref().is_some_and(|a| expected.contains(a)), "{what}: got {answer:02x?}, expected one of {expected:02x?}");
    }
    expect_closed(c, what);
}

/// Asserts the connection is alive: PINGREQ gets PINGRESP.
fn expect_alive(c: &mut Raw, what: &str) {
    c.send(&PINGREQ);
    expect_frame(c, &PINGRESP, what);
}

/// Sends each case's bytes on a fresh connection and expects `reason` and the close.
fn assert_each_refused(addr: SocketAddr, version: ProtocolVersion, reason: u8, cases: &[(&str, Vec<u8>)]) {
    for (case, bytes) in cases {
        let what = format!("{} {case}", name(version));
        let mut c = connected(addr, version, &what);
        c.send(bytes);
        expect_refused(&mut c, reason, &what);
    }
}

#[test]
fn malformed_packets_get_0x81_and_the_close() {
    let b = broker("");
    let before = b.metric("rampart_malformed_packets_total");
    let mut sent = 0;
    for version in VERSIONS {
        let cases = [
            ("PUBREL with reserved flags 0000", vec![0x60, 0x02, 0x00, 0x01]),
            ("SUBSCRIBE with reserved flags 0000", vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00]),
            ("PINGREQ with reserved flags 0001", vec![0xC1, 0x00]),
            ("PUBLISH at QoS 3", vec![0x36, 0x03, 0x00, 0x01, b'a']),
            ("PUBLISH QoS 0 with DUP", vec![0x38, 0x03, 0x00, 0x01, b'a']),
            ("reserved packet type 0", vec![0x00, 0x00]),
            ("remaining length of 5 bytes", vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            ("topic length past the packet end", vec![0x30, 0x03, 0x00, 0x0A, b'a']),
            ("NUL in the topic", raw_publish(version, b"a/\0/b")),
            ("topic not UTF-8", raw_publish(version, &[b'a', 0xC3, 0x28])),
        ];
        assert_each_refused(b.tcp.unwrap(), version, MALFORMED, &cases);
        sent += cases.len() as i64;
    }
    assert_eq!(b.metric("rampart_malformed_packets_total") - before, sent, "every malformed packet is counted");
}

#[test]
fn publish_to_a_wildcard_topic_gets_0x90_and_the_close() {
    let b = broker("");
    for version in VERSIONS {
        let cases = [
            ("single-level wildcard", raw_publish(version, b"a/+/b")),
            ("multi-level wildcard", raw_publish(version, b"a/#")),
            ("bare +", raw_publish(version, b"+")),
        ];
        assert_each_refused(b.tcp.unwrap(), version, TOPIC_NAME_INVALID, &cases);
    }
}

#[test]
fn protocol_errors_get_0x82_and_the_close() {
    let b = broker("");
    for version in VERSIONS {
        let mut second_connect = bytes::BytesMut::new();
        rampart_node::mqtt::codec::encode(version, &connect_packet("again", true, None), &mut second_connect, None).unwrap();
        let props = no_properties(version);
        let cases = [
            ("second CONNECT", second_connect.to_vec()),
            ("AUTH without an authentication method", vec![0xF0, 0x00]),
            ("QoS 1 PUBLISH with packet id 0", raw(0x32, &[&[0x00, 0x01, b'a', 0x00, 0x00], props])),
            ("SUBSCRIBE with packet id 0", raw(0x82, &[&[0x00, 0x00], props, &[0x00, 0x01, b'a', 0x00]])),
            ("SUBSCRIBE without a topic filter", raw(0x82, &[&[0x00, 0x01], props])),
            ("UNSUBSCRIBE without a topic filter", raw(0xA2, &[&[0x00, 0x01], props])),
            ("PUBLISH with an empty topic and no alias", raw_publish(version, b"")),
        ];
        // 3.1.1 has no AUTH packet (malformed there) and no server DISCONNECT: both just close.
        assert_each_refused(b.tcp.unwrap(), version, PROTOCOL_ERROR, &cases);
    }
}

#[test]
fn v5_topic_alias_errors_close_the_connection() {
    const TOPIC_ALIAS_INVALID: u8 = 0x94;
    let b = broker("topic_alias_maximum = 2");
    let addr = b.tcp.unwrap();
    // Alias 0 breaks MQTT-3.3.2-8 without a reason code of its own: 0x82 and 0x94 both fit.
    let cases: [(&str, Vec<u8>, &[u8]); 3] = [
        ("alias above the maximum", aliased_publish(b"t", 3), &[TOPIC_ALIAS_INVALID]),
        ("alias 0", aliased_publish(b"t", 0), &[PROTOCOL_ERROR, TOPIC_ALIAS_INVALID]),
        ("alias used before it was set", aliased_publish(b"", 1), &[PROTOCOL_ERROR]),
    ];
    for (case, bytes, reasons) in cases {
        let mut c = connected(addr, V5, case);
        c.send(&bytes);
        expect_refused_with_one_of(&mut c, reasons, case);
    }
    // Within the maximum, an alias set on one connection is unknown on another.
    let mut sets = connected(addr, V5, "sets alias 2");
    sets.send(&aliased_publish(b"t", 2));
    sets.send(&aliased_publish(b"", 2));
    expect_alive(&mut sets, "alias set, then used");
    let mut other = connected(addr, V5, "another connection");
    other.send(&aliased_publish(b"", 2));
    expect_refused(&mut other, PROTOCOL_ERROR, "alias of another connection");
}

#[test]
fn a_client_stalled_mid_packet_is_dropped_by_its_keep_alive() {
    const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    let b = broker("");
    for version in VERSIONS {
        let what = format!("{} half a PUBLISH, keep alive 1 s", name(version));
        let mut connect = connect_packet(&what, true, None);
        if let Packet::Connect(c) = &mut connect {
            c.keep_alive = 1;
        }
        let (mut c, _) = open(b.tcp.unwrap(), version, &connect);
        let started = Instant::now();
        c.send(&raw_publish(version, b"stalled/topic")[..6]);
        expect_refused(&mut c, KEEP_ALIVE_TIMEOUT, &what);
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(4), "{what}: closed after {elapsed:?}");
    }
}

#[test]
fn a_packet_over_max_packet_size_is_refused_from_its_header() {
    let b = broker("max_packet_size = 1024");
    let (oversized, malformed) = (b.metric("rampart_oversized_packets_total"), b.metric("rampart_malformed_packets_total"));
    for version in VERSIONS {
        let what = format!("{} packet at the limit", name(version));
        let mut c = connected(b.tcp.unwrap(), version, &what);
        c.send_packet(&publish_of_size(version, 1024));
        expect_frame(&mut c, &ack(PUBACK, 1), &what);

        // Remaining length 1022 (0xFE 0x07): 1025 bytes in all. Only the header is sent.
        let what = format!("{} header of a 1025-byte packet", name(version));
        c.send(&[0x30, 0xFE, 0x07]);
        expect_refused(&mut c, PACKET_TOO_LARGE, &what);
    }
    assert_eq!(b.metric("rampart_oversized_packets_total") - oversized, VERSIONS.len() as i64, "counted as oversized");
    assert_eq!(b.metric("rampart_malformed_packets_total"), malformed, "not as malformed");
}

#[test]
fn the_first_packet_must_be_connect() {
    let b = broker("");
    let cases: [(&str, &[u8]); 3] = [
        ("PINGREQ", &PINGREQ),
        ("PUBLISH", &[0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i']),
        ("SUBSCRIBE", &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00]),
    ];
    for (first, bytes) in cases {
        let mut c = Raw::socket(b.tcp.unwrap(), V311);
        c.send(bytes);
        expect_closed(&mut c, &format!("{first} before CONNECT"));
    }
}

#[test]
fn mqisdp_protocol_level_3_gets_connack_1_and_the_close() {
    let b = broker("");
    let mut c = Raw::socket(b.tcp.unwrap(), V311);
    // Protocol name "MQIsdp", level 3, clean session, keep alive 60, empty client id.
    c.send(&[0x10, 0x0E, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C, 0x00, 0x00]);
    expect_frame(&mut c, &[0x20, 0x02, 0x00, 0x01], "CONNACK unacceptable protocol version");
    expect_closed(&mut c, "MQIsdp");
}

#[test]
fn pubrel_for_an_unknown_packet_id_gets_pubcomp_and_the_connection_stays() {
    let b = broker("");
    for version in VERSIONS {
        let what = format!("{} PUBREL 9", name(version));
        let mut c = connected(b.tcp.unwrap(), version, &what);
        c.send(&ack(PUBREL, 9));
        let expected: &[u8] = match version {
            V311 => &[PUBCOMP, 0x02, 0x00, 0x09],
            V5 => &[PUBCOMP, 0x03, 0x00, 0x09, PACKET_ID_NOT_FOUND],
        };
        expect_frame(&mut c, expected, &what);
        expect_alive(&mut c, &what);
    }
}

#[test]
fn unreleased_qos2_messages_beyond_receive_maximum_get_0x93_in_v5_only() {
    let b = broker("receive_maximum = 2");
    for version in VERSIONS {
        let what = format!("{} QoS 2 window", name(version));
        let mut c = connected(b.tcp.unwrap(), version, &what);
        for pkid in 1..=2 {
            c.send_packet(&publish_packet("rm/t", QoS::ExactlyOnce, pkid, "x"));
            expect_frame(&mut c, &ack(PUBREC, pkid), &what);
        }
        // Releasing one frees its slot.
        c.send(&ack(PUBREL, 1));
        expect_frame(&mut c, &ack(PUBCOMP, 1), &what);
        c.send_packet(&publish_packet("rm/t", QoS::ExactlyOnce, 3, "x"));
        expect_frame(&mut c, &ack(PUBREC, 3), &what);
        // A third unreleased message: MQTT 5 has a Receive Maximum, 3.1.1 does not.
        c.send_packet(&publish_packet("rm/t", QoS::ExactlyOnce, 4, "x"));
        match version {
            V311 => {
                expect_frame(&mut c, &ack(PUBREC, 4), &what);
                expect_alive(&mut c, &what);
            }
            V5 => expect_refused(&mut c, RECEIVE_MAXIMUM_EXCEEDED, &what),
        }
    }
}

#[test]
fn silent_and_half_connect_clients_are_dropped_after_the_connect_timeout() {
    let b = broker("connect_timeout_secs = 1");
    let addr = b.tcp.unwrap();
    let started = Instant::now();
    let mut silent = Raw::socket(addr, V311);
    let mut half = Raw::socket(addr, V311);
    half.send(&[0x10, 0x10, 0x00, 0x04, b'M', b'Q']);
    // A CONNECT that arrives in two parts within the timeout is served.
    let mut slow = Raw::socket(addr, V311);
    let mut connect = bytes::BytesMut::new();
    rampart_node::mqtt::codec::encode(V311, &connect_packet("slow-but-in-time", true, None), &mut connect, None).unwrap();
    slow.send(&connect[..5]);
    std::thread::sleep(Duration::from_millis(400));
    slow.send(&connect[5..]);
    assert!(matches!(slow.recv(), Some(Packet::ConnAck(a)) if a.code == v5::ConnectReturnCode::Success));

    expect_closed(&mut silent, "silent client");
    expect_closed(&mut half, "half a CONNECT");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "closed before the connect timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "closed long after the 1 s connect timeout: {elapsed:?}");
    expect_alive(&mut slow, "the client that completed its CONNECT in time");
}

/// Asserts a connection past the limit is refused: CONNACK 3 (3.1.1) / 0x89 or 0x97 (5) and
/// the close, or an immediate close; never a successful CONNACK.
fn expect_busy(addr: SocketAddr, version: ProtocolVersion) {
    let what = format!("{} connection past the limit", name(version));
    let mut c = Raw::socket(addr, version);
    c.send_packet(&connect_packet("over-the-limit", true, None));
    if let Some(frame) = c.recv_frame() {
        let refusals: &[u8] = if version == V5 { &[0x89, 0x97] } else { &[0x03] };
        assert!(frame.len() >= 4 && frame[0] == 0x20 && refusals.contains(&frame[3]), "{what}: got {frame:02x?}");
        expect_closed(&mut c, &what);
    }
}

#[test]
fn connections_beyond_max_connections_are_refused_and_a_freed_slot_is_reused() {
    let b = broker("max_connections = 5\nconnect_timeout_secs = 1");
    let addr = b.tcp.unwrap();
    let mut open: Vec<Raw> = (0..5).map(|i| connected(addr, VERSIONS[i % 2], &format!("slot-{i}"))).collect();
    assert_eq!(b.metric("rampart_connections"), 5);
    for version in VERSIONS {
        expect_busy(addr, version);
    }
    for (i, c) in open.iter_mut().enumerate() {
        expect_alive(c, &format!("connection {i} inside the limit"));
    }

    let mut leaving = open.pop().unwrap();
    leaving.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
    expect_closed(&mut leaving, "client that disconnected");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut reused = loop {
        let mut c = Raw::socket(addr, V5);
        c.send_packet(&connect_packet("after-a-slot-freed", true, None));
        match c.recv() {
            Some(Packet::ConnAck(a)) if a.code == v5::ConnectReturnCode::Success => break c,
            other => assert!(Instant::now() < deadline, "the freed slot was not reused; last answer {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    expect_alive(&mut reused, "connection in the freed slot");
    expect_busy(addr, V311);
}

/// A storm of 30 connections under `accept_rate = 20`, `accept_burst = 5`: all get in, the last
/// about 25 / 20 s after the first, and those that waited (25 when all come at once) are counted.
#[test]
fn a_connection_storm_is_let_in_at_the_accept_rate() {
    let b = broker("accept_rate = 20\naccept_burst = 5");
    let addr = b.tcp.unwrap();
    let started = Instant::now();
    let storm: Vec<_> = (0..30)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Raw::socket(addr, V5);
                c.send_packet(&connect_packet(&format!("storm-{i}"), true, None));
                match c.recv() {
                    Some(Packet::ConnAck(a)) if a.code == v5::ConnectReturnCode::Success => (Instant::now(), c),
                    other => panic!("storm-{i} got {other:?}"),
                }
            })
        })
        .collect();
    let mut connected: Vec<(Instant, Raw)> = storm.into_iter().map(|t| t.join().unwrap()).collect();
    let last = connected.iter().map(|(at, _)| *at).max().unwrap() - started;
    assert!(last >= Duration::from_millis(1100), "30 connections at 20/s after a burst of 5 take about 1.25 s, not {last:?}");
    assert!(last < Duration::from_secs(5), "the storm was let in too slowly: {last:?}");
    let deferred = b.metric("rampart_connections_deferred_total");
    assert!((20..=25).contains(&deferred), "all but the burst waited (fewer if some came late): {deferred}");
    for (i, (_, c)) in connected.iter_mut().enumerate() {
        expect_alive(c, &format!("storm connection {i}"));
    }
}

#[test]
fn a_subscriber_that_never_reads_does_not_stall_the_others() {
    const MESSAGES: usize = 400;
    let b = broker("max_queued_messages = 16\nslow_subscriber_timeout_ms = 200\nwrite_timeout_secs = 60");
    let addr = b.tcp.unwrap();
    let mut stuck = connected(addr, V311, "never-reads");
    let mut reader = connected(addr, V5, "reads");
    subscribe(&mut stuck, "firehose", QoS::AtMostOnce);
    subscribe(&mut reader, "firehose", QoS::AtMostOnce);
    let reading = std::thread::spawn(move || {
        for n in 0..MESSAGES {
            match reader.recv() {
                Some(Packet::Publish(p)) => assert_eq!(p.payload.len(), 64 * 1024),
                other => panic!("the reading subscriber got {other:?} after {n} messages"),
            }
        }
    });
    let mut publisher = connected(addr, V311, "firehose-publisher");
    let started = Instant::now();
    for _ in 0..MESSAGES {
        publisher.send_packet(&publish_packet("firehose", QoS::AtMostOnce, 0, vec![7u8; 64 * 1024]));
    }
    reading.join().expect("the reading subscriber received every message");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(b.metric("rampart_messages_dropped_total{reason=\"slow_subscriber_qos0\"}") > 0);
    expect_alive(&mut publisher, "publisher");
    drop(stuck);
}

#[test]
fn an_offline_queue_keeps_the_newest_acknowledged_messages_and_counts_the_rest() {
    const CAPACITY: u16 = 10;
    const SENT: u16 = 15;
    let b = broker("max_queued_messages = 10");
    let addr = b.tcp.unwrap();
    let mut publisher = connected(addr, V5, "offline-publisher");
    for (round, version) in VERSIONS.into_iter().enumerate() {
        let what = format!("{} offline subscriber", name(version));
        let topic = format!("offline/{}", name(version));
        let client_id = format!("offline-{}", name(version));
        let expiry = (version == V5).then_some(300);
        let (mut sub, present) = open(addr, version, &connect_packet(&client_id, false, expiry));
        assert!(!present);
        subscribe(&mut sub, &topic, QoS::AtLeastOnce);
        sub.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
        expect_closed(&mut sub, &what);

        for i in 1..=SENT {
            publisher.send_packet(&publish_packet(&topic, QoS::AtLeastOnce, i, i.to_string()));
            expect_frame(&mut publisher, &ack(PUBACK, i), "every QoS 1 message is acknowledged");
        }

        let (mut back, present) = open(addr, version, &connect_packet(&client_id, false, expiry));
        assert!(present, "{what}: the session survived");
        let mut got = Vec::new();
        while got.len() < usize::from(CAPACITY) {
            match back.recv() {
                Some(Packet::Publish(p)) => {
                    back.send(&ack(PUBACK, p.pkid));
                    got.push(String::from_utf8(p.payload.to_vec()).unwrap());
                }
                other => panic!("{what}: expected PUBLISH after {} messages, got {other:?}", got.len()),
            }
        }
        let newest: Vec<String> = (SENT - CAPACITY + 1..=SENT).map(|i| i.to_string()).collect();
        assert_eq!(got, newest, "{what}: the newest messages, oldest first");
        expect_alive(&mut back, &what);
        let dropped = i64::from(SENT - CAPACITY) * (round as i64 + 1);
        assert_eq!(b.metric("rampart_messages_dropped_total{reason=\"queue_full\"}"), dropped, "{what}");
    }
}
