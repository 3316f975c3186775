//! Refusals answered with an exact code on raw sockets, beside `bad_input.rs`: invalid filters
//! refused one SUBACK slot at a time, and the exact CONNACK past the connection limit.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Options, Raw};
use mqttbytes::v5;
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::{V311, V5};

fn broker(limits: &'static str) -> Broker {
    Broker::start(Options { limits, all_listeners: false })
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
