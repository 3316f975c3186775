//! Bad input from clients, on raw sockets: every case gets its documented answer (MQTT 5 reason
//! code, 3.1.1 return code or close), and nothing that was acknowledged is lost.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Options, Raw};
use mqttbytes::v5::{self, DisconnectReasonCode as Reason};
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::{self, V311, V5};

fn broker(limits: &'static str) -> Broker {
    Broker::start(Options { limits, all_listeners: false })
}

/// Expected close for a protocol violation: MQTT 5 names the reason, 3.1.1 just closes.
fn reason_for(version: ProtocolVersion, reason: Reason) -> Option<Reason> {
    (version == V5).then_some(reason)
}

/// A QoS 0 PUBLISH with an arbitrary (possibly invalid) topic and an empty payload.
fn publish_bytes(version: ProtocolVersion, topic: &[u8]) -> Vec<u8> {
    let properties: &[u8] = if version == V5 { &[0x00] } else { &[] };
    let mut bytes = vec![0x30, (2 + topic.len() + properties.len()) as u8, 0x00, topic.len() as u8];
    bytes.extend_from_slice(topic);
    bytes.extend_from_slice(properties);
    bytes
}

#[test]
fn malformed_and_invalid_packets_close_the_connection() {
    let b = broker("max_packet_size = 1024");
    let addr = b.tcp.unwrap();
    for version in [V311, V5] {
        let cases: [(&str, Vec<u8>, Reason); 5] = [
            ("reserved flags", vec![0x60, 0x02, 0x00, 0x01], Reason::MalformedPacket),
            ("wildcard topic", publish_bytes(version, b"a/+/b"), Reason::TopicNameInvalid),
            ("NUL in topic", publish_bytes(version, b"a/\0/b"), Reason::MalformedPacket),
            ("invalid UTF-8", publish_bytes(version, &[b'a', 0xC3, 0x28]), Reason::MalformedPacket),
            ("oversized, header only", vec![0x30, 0xFF, 0x7F], Reason::PacketTooLarge),
        ];
        for (name, bytes, reason) in cases {
            let mut c = Raw::connect(addr, version, &format!("bad-{name}"));
            c.send(&bytes);
            c.expect_close(reason_for(version, reason));
        }
        let mut again = Raw::connect(addr, version, "second-connect");
        again.send_packet(&Packet::Connect(v5::Connect::new("second-connect")));
        again.expect_close(reason_for(version, Reason::ProtocolError));
    }
    assert!(b.metric("rampart_malformed_packets_total") >= 6);
}

#[test]
fn auth_without_a_method_is_a_protocol_error() {
    let b = broker("");
    let mut c = Raw::connect(b.tcp.unwrap(), V5, "auth");
    c.send(&[0xF0, 0x00]);
    c.expect_close(Some(Reason::ProtocolError));
}

#[test]
fn first_packet_must_be_connect_and_old_protocols_are_refused() {
    let b = broker("");
    let mut c = Raw::socket(b.tcp.unwrap(), V311);
    c.send(&[0xC0, 0x00]);
    c.expect_close(None);

    let mut old = Raw::socket(b.tcp.unwrap(), V311);
    old.send(&[0x10, 0x0E, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C, 0x00, 0x00]);
    match old.recv() {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, v5::ConnectReturnCode::UnsupportedProtocolVersion),
        other => panic!("expected CONNACK rc 1, got {other:?}"),
    }
    old.expect_close(None);
}

#[test]
fn pubrel_for_an_unknown_packet_id_is_answered_and_the_connection_stays() {
    let b = broker("");
    for version in [V311, V5] {
        let mut c = Raw::connect(b.tcp.unwrap(), version, "pubrel");
        c.send_packet(&Packet::PubRel(v5::PubRel::new(9)));
        match c.recv() {
            Some(Packet::PubComp(comp)) => {
                assert_eq!(comp.pkid, 9);
                let expected = if version == V5 { v5::PubCompReason::PacketIdentifierNotFound } else { v5::PubCompReason::Success };
                assert_eq!(comp.reason, expected);
            }
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        c.send_packet(&Packet::PingReq);
        assert_eq!(c.recv(), Some(Packet::PingResp));
    }
}

#[test]
fn invalid_filters_are_refused_in_their_suback_slot() {
    let b = broker("");
    for (version, refused) in [(V311, v5::SubscribeReasonCode::Unspecified), (V5, v5::SubscribeReasonCode::TopicFilterInvalid)] {
        let mut c = Raw::connect(b.tcp.unwrap(), version, "filters");
        let mut subscribe = v5::Subscribe::new("ok/+", QoS::AtLeastOnce);
        subscribe.pkid = 5;
        for bad in ["bad+/x", "a/#/b", "$share/g+/x"] {
            subscribe.filters.push(v5::SubscribeFilter::new(bad.into(), QoS::AtMostOnce));
        }
        c.send_packet(&Packet::Subscribe(subscribe));
        match c.recv() {
            Some(Packet::SubAck(ack)) => assert_eq!(ack.return_codes, [v5::SubscribeReasonCode::QoS1, refused, refused, refused]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

#[test]
fn receive_maximum_is_enforced_for_qos2() {
    let b = broker("receive_maximum = 2");
    let mut c = Raw::connect(b.tcp.unwrap(), V5, "rm");
    for pkid in 1..=3 {
        let mut p = v5::Publish::new("rm/t", QoS::ExactlyOnce, "x");
        p.pkid = pkid;
        c.send_packet(&Packet::Publish(p));
    }
    assert!(matches!(c.recv(), Some(Packet::PubRec(r)) if r.pkid == 1));
    assert!(matches!(c.recv(), Some(Packet::PubRec(r)) if r.pkid == 2));
    c.expect_close(Some(Reason::ReceiveMaximumExceeded));
}

#[test]
fn silent_and_half_packet_clients_are_dropped_after_the_connect_timeout() {
    let b = broker("connect_timeout_secs = 1");
    let started = Instant::now();
    let mut silent = Raw::socket(b.tcp.unwrap(), V311);
    let mut half = Raw::socket(b.tcp.unwrap(), V311);
    half.send(&[0x10, 0x10, 0x00, 0x04, b'M', b'Q']);
    silent.expect_close(None);
    half.expect_close(None);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[test]
fn connections_past_the_limit_get_server_busy() {
    let b = broker("max_connections = 3");
    let addr = b.tcp.unwrap();
    let mut open: Vec<Raw> = (0..3).map(|i| Raw::connect(addr, V5, &format!("ok-{i}"))).collect();
    for (version, client_id) in [(V311, "over-3"), (V5, "over-5")] {
        let mut over = Raw::socket(addr, version);
        over.send_packet(&Packet::Connect(v5::Connect::new(client_id)));
        match over.recv() {
            Some(Packet::ConnAck(ack)) => {
                let expected = if version == V5 { v5::ConnectReturnCode::ServerBusy } else { v5::ConnectReturnCode::ServerUnavailable };
                assert_eq!(ack.code, expected);
            }
            other => panic!("expected a refusing CONNACK, got {other:?}"),
        }
        over.expect_close(None);
    }
    for c in &mut open {
        c.send_packet(&Packet::PingReq);
        assert_eq!(c.recv(), Some(Packet::PingResp), "existing connections keep working");
    }
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metric("rampart_connections") >= 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Raw::connect(addr, V5, "after-a-slot-freed");
}

#[test]
fn offline_queue_keeps_the_newest_acknowledged_messages_and_counts_the_rest() {
    let b = broker("max_queued_messages = 10");
    let addr = b.tcp.unwrap();
    let mut sub = Raw::socket(addr, V311);
    let mut connect = v5::Connect::new("offline-sub");
    connect.clean_session = false;
    sub.send_packet(&Packet::Connect(connect.clone()));
    assert!(matches!(sub.recv(), Some(Packet::ConnAck(_))));
    let mut subscribe = v5::Subscribe::new("q/t", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    sub.send_packet(&Packet::Subscribe(subscribe));
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    sub.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
    sub.expect_close(None);

    let mut publisher = Raw::connect(addr, V311, "offline-pub");
    for i in 1..=15u16 {
        let mut p = v5::Publish::new("q/t", QoS::AtLeastOnce, i.to_string());
        p.pkid = i;
        publisher.send_packet(&Packet::Publish(p));
        assert!(matches!(publisher.recv(), Some(Packet::PubAck(a)) if a.pkid == i), "every message is acknowledged");
    }
    let mut back = Raw::socket(addr, V311);
    back.send_packet(&Packet::Connect(connect));
    assert!(matches!(back.recv(), Some(Packet::ConnAck(a)) if a.session_present));
    let mut got = Vec::new();
    while got.len() < 10 {
        match back.recv() {
            Some(Packet::Publish(p)) => {
                back.send_packet(&Packet::PubAck(v5::PubAck::new(p.pkid)));
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let expected: Vec<String> = (6..=15).map(|i: u16| i.to_string()).collect();
    assert_eq!(got, expected);
    assert_eq!(b.metric("rampart_messages_dropped_total{reason=\"queue_full\"}"), 5);
}

#[test]
fn a_subscriber_that_stops_reading_does_not_stall_the_others() {
    let b = broker("max_queued_messages = 16\nslow_subscriber_timeout_ms = 200\nwrite_timeout_secs = 60");
    let addr = b.tcp.unwrap();
    let mut stuck = Raw::connect(addr, V311, "stuck");
    let mut reader = Raw::connect(addr, V311, "reader");
    for c in [&mut stuck, &mut reader] {
        let mut subscribe = v5::Subscribe::new("firehose", QoS::AtMostOnce);
        subscribe.pkid = 1;
        c.send_packet(&Packet::Subscribe(subscribe));
        assert!(matches!(c.recv(), Some(Packet::SubAck(_))));
    }
    let reader_thread = std::thread::spawn(move || {
        let mut n = 0;
        while n < 400 {
            match reader.recv() {
                Some(Packet::Publish(_)) => n += 1,
                other => panic!("reader got {other:?} after {n} messages"),
            }
        }
        n
    });
    let mut publisher = Raw::connect(addr, V311, "firehose-pub");
    let payload = vec![7u8; 64 * 1024];
    let started = Instant::now();
    for _ in 0..400 {
        publisher.send_packet(&Packet::Publish(v5::Publish::new("firehose", QoS::AtMostOnce, payload.clone())));
    }
    assert_eq!(reader_thread.join().unwrap(), 400, "the reading subscriber got every message");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(b.metric("rampart_messages_dropped_total{reason=\"slow_subscriber_qos0\"}") > 0);
    drop(stuck);
}
