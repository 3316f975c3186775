//! Interoperability with Debian's `mosquitto_pub` / `mosquitto_sub` (MQTT 3.1.1 and 5.0, TCP
//! and TLS): QoS round trips, retained messages, wills of killed clients, MQTT 5 properties.

mod common;

use common::mosquitto::{output, publish, subscribe, wait_subscriptions};
use common::Broker;

const VERSIONS: [&str; 2] = ["mqttv311", "mqttv5"];

#[test]
fn qos_round_trips_over_tcp_and_tls() {
    let broker = Broker::start(common::Options { all_listeners: true, ..Default::default() });
    for tls in [false, true] {
        for version in VERSIONS {
            for qos in ["0", "1", "2"] {
                let topic = format!("rt/{tls}/{version}/{qos}");
                assert!(wait_subscriptions(&broker, 0), "previous subscriber gone");
                let sub =
                    subscribe(&broker, tls, &["-V", version, "-q", qos, "-t", &topic, "-C", "1", "-W", "10", "-F", "%t %q %p"], Some(1));
                publish(&broker, tls, &["-V", version, "-q", qos, "-t", &topic, "-m", "payload"]);
                assert_eq!(output(sub).trim(), format!("{topic} {qos} payload"));
            }
        }
    }
}

#[test]
fn retained_messages_are_stored_and_cleared() {
    let broker = Broker::start(common::Options::default());
    for version in VERSIONS {
        let topic = format!("retained/{version}");
        publish(&broker, false, &["-V", version, "-q", "1", "-r", "-t", &topic, "-m", "last-known"]);
        let sub = subscribe(&broker, false, &["-V", version, "-t", &topic, "-C", "1", "-W", "10", "-F", "%r %p"], None);
        assert_eq!(output(sub).trim(), "1 last-known");
        publish(&broker, false, &["-V", version, "-q", "1", "-r", "-n", "-t", &topic]);
        let sub = subscribe(&broker, false, &["-V", version, "-t", &topic, "-W", "1"], None);
        assert_eq!(output(sub), "", "a cleared retained message is not delivered");
    }
}

#[test]
fn will_of_a_killed_client_is_published() {
    let broker = Broker::start(common::Options::default());
    for version in VERSIONS {
        let will_topic = format!("wills/{version}");
        assert!(wait_subscriptions(&broker, 0), "previous subscribers gone");
        let watcher = subscribe(&broker, false, &["-V", version, "-t", &will_topic, "-C", "1", "-W", "10"], Some(1));
        let mut doomed = subscribe(
            &broker,
            false,
            &["-V", version, "-t", "anything", "--will-topic", &will_topic, "--will-payload", "device lost", "--will-qos", "1"],
            Some(2),
        );
        doomed.kill().expect("kill");
        let _ = doomed.wait();
        assert_eq!(output(watcher).trim(), "device lost");
    }
}

#[test]
fn mqtt5_properties_pass_through() {
    let broker = Broker::start(common::Options::default());
    let sub = subscribe(&broker, false, &["-V", "mqttv5", "-t", "props/x", "-C", "1", "-W", "10", "-F", "%P|%E|%p"], Some(1));
    publish(
        &broker,
        false,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "props/x",
            "-m",
            "v",
            "-D",
            "publish",
            "user-property",
            "site",
            "plant-7",
            "-D",
            "publish",
            "message-expiry-interval",
            "60",
        ],
    );
    let printed = output(sub);
    let fields: Vec<&str> = printed.trim().split('|').collect();
    assert_eq!(fields[0], "site:plant-7");
    let expiry: u32 = fields[1].parse().expect("expiry interval");
    assert!((55..=60).contains(&expiry), "{expiry}");
    assert_eq!(fields[2], "v");
}
