//! Interoperability with the Rust `rumqttc` client (MQTT 3.1.1 and 5.0): ordered QoS 1 streams
//! with nothing lost, QoS 2, persistent sessions across reconnects, takeover, MQTT 5 properties.

mod common;

use std::time::Duration;

use common::Broker;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn options(broker: &Broker, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.tcp_port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Polls until `want` returns a value, failing on a connection error or after [`WAIT`].
async fn poll_until<T>(events: &mut EventLoop, mut want: impl FnMut(&Event) -> Option<T>) -> T {
    timeout(WAIT, async {
        loop {
            let event = events.poll().await.expect("connection error");
            if let Some(found) = want(&event) {
                return found;
            }
        }
    })
    .await
    .expect("timed out waiting for an event")
}

async fn connect(broker: &Broker, client_id: &str, clean: bool) -> (AsyncClient, EventLoop, bool) {
    let mut opts = options(broker, client_id);
    opts.set_clean_session(clean);
    let (client, mut events) = AsyncClient::new(opts, 100);
    let present = poll_until(&mut events, |e| match e {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
        _ => None,
    })
    .await;
    (client, events, present)
}

async fn subscribed(client: &AsyncClient, events: &mut EventLoop, filter: &str, qos: QoS) {
    client.subscribe(filter, qos).await.unwrap();
    poll_until(events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await;
}

/// Drives both event loops until `n` publishes arrived at the subscriber; returns their payloads.
async fn receive(subscriber: &mut EventLoop, publisher: &mut EventLoop, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::with_capacity(n);
    timeout(WAIT, async {
        while got.len() < n {
            tokio::select! {
                event = subscriber.poll() => if let Event::Incoming(Packet::Publish(p)) = event.expect("subscriber connection") {
                    got.push(p.payload.to_vec());
                },
                event = publisher.poll() => { event.expect("publisher connection"); }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("received only {} of {n} messages", got.len()));
    got
}

#[tokio::test]
async fn a_thousand_qos1_messages_arrive_in_order() {
    let broker = Broker::start(common::Options::default());
    let (sub, mut sub_events, _) = connect(&broker, "ordered-sub", true).await;
    subscribed(&sub, &mut sub_events, "ordered/#", QoS::AtLeastOnce).await;
    let (publisher, mut pub_events, _) = connect(&broker, "ordered-pub", true).await;
    tokio::spawn(async move {
        for i in 0..1000u32 {
            publisher.publish("ordered/x", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec()).await.unwrap();
        }
    });
    let got = receive(&mut sub_events, &mut pub_events, 1000).await;
    let expected: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn qos2_is_delivered_exactly_once() {
    let broker = Broker::start(common::Options::default());
    let (sub, mut sub_events, _) = connect(&broker, "q2-sub", true).await;
    subscribed(&sub, &mut sub_events, "q2", QoS::ExactlyOnce).await;
    let (publisher, mut pub_events, _) = connect(&broker, "q2-pub", true).await;
    for i in 0..20u8 {
        publisher.publish("q2", QoS::ExactlyOnce, false, vec![i]).await.unwrap();
    }
    let got = receive(&mut sub_events, &mut pub_events, 20).await;
    assert_eq!(got, (0..20u8).map(|i| vec![i]).collect::<Vec<_>>());
    let extra = timeout(Duration::from_millis(500), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = sub_events.poll().await {
                return p;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "a QoS 2 message arrived twice: {extra:?}");
}

#[tokio::test]
async fn persistent_session_collects_messages_while_offline() {
    let broker = Broker::start(common::Options::default());
    let (sub, mut sub_events, present) = connect(&broker, "persistent", false).await;
    assert!(!present);
    subscribed(&sub, &mut sub_events, "offline/+", QoS::AtLeastOnce).await;
    sub.disconnect().await.unwrap();
    let _ = timeout(WAIT, async { while sub_events.poll().await.is_ok() {} }).await;
    drop(sub_events);

    let (publisher, mut pub_events, _) = connect(&broker, "offline-pub", true).await;
    for i in 0..5u8 {
        publisher.publish(format!("offline/{i}"), QoS::AtLeastOnce, false, vec![i]).await.unwrap();
    }
    let mut acked = 0;
    while acked < 5 {
        acked += poll_until(&mut pub_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(1)).await;
    }
    let (_back, mut back_events, present) = connect(&broker, "persistent", false).await;
    assert!(present, "the session survived the disconnect");
    let got = receive(&mut back_events, &mut pub_events, 5).await;
    assert_eq!(got, (0..5u8).map(|i| vec![i]).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_second_connection_takes_over_the_client_id() {
    let broker = Broker::start(common::Options::default());
    let (_first, mut first_events, _) = connect(&broker, "same-id", true).await;
    let (second, mut second_events, _) = connect(&broker, "same-id", true).await;
    let closed = timeout(WAIT, async {
        loop {
            if first_events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the first connection was not closed");
    subscribed(&second, &mut second_events, "still/here", QoS::AtLeastOnce).await;
}

#[tokio::test]
async fn mqtt5_user_properties_and_topic_alias() {
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let broker = Broker::start(common::Options::default());
    let connect5 = |id: &str| {
        let mut o = Options5::new(id, "127.0.0.1", broker.tcp_port());
        o.set_keep_alive(Duration::from_secs(30));
        Client5::new(o, 100)
    };
    let (sub, mut sub_events) = connect5("v5-sub");
    let (publisher, mut pub_events) = connect5("v5-pub");
    sub.subscribe("v5/props", QoS5::AtLeastOnce).await.unwrap();
    timeout(WAIT, async {
        loop {
            if let Event5::Incoming(Packet5::SubAck(_)) = sub_events.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .unwrap();
    let props = PublishProperties { user_properties: vec![("site".into(), "plant-7".into())], topic_alias: Some(1), ..Default::default() };
    publisher.publish_with_properties("v5/props", QoS5::AtLeastOnce, false, "first", props).await.unwrap();
    let aliased = PublishProperties { topic_alias: Some(1), ..Default::default() };
    publisher.publish_with_properties("", QoS5::AtLeastOnce, false, "second", aliased).await.unwrap();
    let got = timeout(WAIT, async {
        let mut got = Vec::new();
        while got.len() < 2 {
            tokio::select! {
                event = sub_events.poll() => if let Event5::Incoming(Packet5::Publish(p)) = event.unwrap() {
                    got.push((String::from_utf8(p.payload.to_vec()).unwrap(), p.properties.map(|p| p.user_properties).unwrap_or_default()));
                },
                event = pub_events.poll() => { event.unwrap(); }
            }
        }
        got
    })
    .await
    .expect("both messages");
    assert_eq!(got[0], ("first".to_string(), vec![("site".to_string(), "plant-7".to_string())]));
    assert_eq!(got[1].0, "second");
}
