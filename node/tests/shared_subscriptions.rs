//! Shared groups (`$share/<group>/<filter>`) on one node when a member does not take its
//! message: a member that refuses it (MQTT 5 PUBACK reason 0x80), one that never acknowledges
//! it (`shared_ack_timeout_ms`) and one that leaves holding it. Each time the other member —
//! a real `mosquitto_sub` — gets the message.

mod common;

use std::time::Duration;

use common::mosquitto::{output, publish, subscribe};
use common::{Broker, Options, Raw};
use mqttbytes::v5;
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::V5;

const GROUP: &str = "$share/workers/jobs/#";
const MESSAGES: usize = 10;

/// A raw MQTT 5 member of [`GROUP`] at QoS 1, and `mosquitto_sub` as the other member, which
/// exits after [`MESSAGES`] messages.
fn members(broker: &Broker, raw_id: &str) -> (Raw, std::process::Child) {
    let mut raw = Raw::connect(broker.tcp.unwrap(), V5, raw_id);
    let mut subscribe_packet = v5::Subscribe::new(GROUP, QoS::AtLeastOnce);
    subscribe_packet.pkid = 1;
    raw.send_packet(&Packet::Subscribe(subscribe_packet));
    assert!(matches!(raw.recv(), Some(Packet::SubAck(_))), "SUBACK for the raw member");
    let args = ["-V", "mqttv5", "-i", "taker", "-q", "1", "-t", GROUP, "-C", "10", "-W", "20"];
    (raw, subscribe(broker, false, &args, Some(2)))
}

/// Publishes job 0 .. MESSAGES-1 at QoS 1.
fn publish_jobs(broker: &Broker) {
    for n in 0..MESSAGES {
        publish(broker, false, &["-V", "mqttv5", "-q", "1", "-t", &format!("jobs/{n}"), "-m", &format!("job {n}")]);
    }
}

/// The PUBLISHes the raw member has been sent (until 5 s pass without one).
fn received(raw: &mut Raw) -> Vec<v5::Publish> {
    std::iter::from_fn(|| raw.recv_if_any())
        .filter_map(|p| match p {
            Packet::Publish(publish) => Some(publish),
            _ => None,
        })
        .collect()
}

/// Asserts that mosquitto_sub printed every job exactly once.
fn assert_every_job_once(taker: std::process::Child) {
    let mut got: Vec<String> = output(taker).lines().map(str::to_string).collect();
    got.sort();
    let mut expected: Vec<String> = (0..MESSAGES).map(|n| format!("job {n}")).collect();
    expected.sort();
    assert_eq!(got, expected, "the other member got every message once");
}

#[test]
fn a_message_a_member_refuses_goes_to_another_member() {
    let broker = Broker::start(Options::default());
    let (mut refuser, taker) = members(&broker, "refuser");
    publish_jobs(&broker);
    let mut refused = 0;
    for publish in received(&mut refuser) {
        let mut nack = v5::PubAck::new(publish.pkid);
        nack.reason = v5::PubAckReason::UnspecifiedError;
        refuser.send_packet(&Packet::PubAck(nack));
        refused += 1;
    }
    assert!(refused > 0, "round robin gave the refusing member some messages");
    assert_every_job_once(taker);
    assert_eq!(broker.metric("rampart_shared_redispatched_total{reason=\"refused\"}"), refused as i64);

    // With no other member left, a refused message is dropped and counted.
    publish(&broker, false, &["-V", "mqttv5", "-q", "1", "-t", "jobs/last", "-m", "last"]);
    let last = received(&mut refuser).pop().expect("the only member gets the message");
    let mut nack = v5::PubAck::new(last.pkid);
    nack.reason = v5::PubAckReason::ImplementationSpecificError;
    refuser.send_packet(&Packet::PubAck(nack));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while broker.metric("rampart_messages_dropped_total{reason=\"shared_group_exhausted\"}") != 1 {
        assert!(std::time::Instant::now() < deadline, "the refused message was not counted as dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn messages_a_member_leaves_with_go_to_another_member() {
    let broker = Broker::start(Options::default());
    let (mut leaver, taker) = members(&broker, "leaver");
    publish_jobs(&broker);
    let held = received(&mut leaver).len();
    assert!(held > 0, "round robin gave the leaving member some messages");
    drop(leaver);
    assert_every_job_once(taker);
    assert_eq!(broker.metric("rampart_shared_redispatched_total{reason=\"member_left\"}"), held as i64);
}

#[test]
fn a_message_left_unacknowledged_past_the_timeout_also_goes_to_another_member() {
    let broker = Broker::start(Options { limits: "shared_ack_timeout_ms = 300", ..Options::default() });
    let (mut sleeper, taker) = members(&broker, "sleeper");
    publish_jobs(&broker);
    let held = received(&mut sleeper);
    assert!(!held.is_empty(), "round robin gave the silent member some messages");
    assert_every_job_once(taker);
    assert_eq!(broker.metric("rampart_shared_redispatched_total{reason=\"ack_timeout\"}"), held.len() as i64);
    // It stays connected and may still acknowledge what it holds.
    for publish in held {
        sleeper.send_packet(&Packet::PubAck(v5::PubAck::new(publish.pkid)));
    }
    sleeper.send_packet(&Packet::PingReq);
    assert_eq!(sleeper.recv(), Some(Packet::PingResp));
}
