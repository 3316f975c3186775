//! Interoperability with the real `rumqttc` 0.25 client, MQTT 3.1.1 (`rumqttc`) and 5.0
//! (`rumqttc::v5`): round trips at every QoS, an ordered QoS 1 stream with nothing lost,
//! retained messages, wills, persistent and clean sessions, takeover, shared subscriptions, and
//! the MQTT 5 topic aliases and user properties. Every wait is bounded.

mod common;

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use common::Broker;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Longest wait for anything that must happen.
const WAIT: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
const QOS5: [QoS5; 3] = [QoS5::AtMostOnce, QoS5::AtLeastOnce, QoS5::ExactlyOnce];

fn broker() -> Broker {
    Broker::start(common::Options::default())
}

/// The event loop of either rumqttc flavour.
trait Driver: Send + 'static {
    type Event: Debug + Send + 'static;
    type Error: Debug + Send + 'static;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send;
}

impl Driver for rumqttc::EventLoop {
    type Event = Event;
    type Error = rumqttc::ConnectionError;
    fn next(&mut self) -> impl Future<Output = Result<Event, Self::Error>> + Send {
        self.poll()
    }
}

impl Driver for rumqttc::v5::EventLoop {
    type Event = rumqttc::v5::Event;
    type Error = rumqttc::v5::ConnectionError;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send {
        self.poll()
    }
}

/// A client whose event loop runs in a task that forwards every event. The task stops at the
/// first connection error, so rumqttc never reconnects behind the test's back, and when the
/// `Conn` is dropped: the socket then closes without DISCONNECT, as when a device dies.
struct Conn<C, D: Driver> {
    client: C,
    events: mpsc::UnboundedReceiver<Result<D::Event, D::Error>>,
    pump: JoinHandle<()>,
}

type Conn3 = Conn<rumqttc::AsyncClient, rumqttc::EventLoop>;
type Conn5 = Conn<rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop>;

impl<C, D: Driver> Conn<C, D> {
    fn start(client: C, mut driver: D) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            loop {
                let event = driver.next().await;
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    break;
                }
            }
        });
        Conn { client, events, pump }
    }

    /// The first event `want` picks; fails on a connection error or after [`WAIT`].
    async fn wait_for<T>(&mut self, what: &str, mut want: impl FnMut(D::Event) -> Option<T>) -> T {
        let found = timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(event)) => {
                        if let Some(found) = want(event) {
                            return found;
                        }
                    }
                    Some(Err(e)) => panic!("{what}: connection error {e:?}"),
                    None => panic!("{what}: the event loop stopped"),
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
    }

    /// The first `n` events `want` picks.
    async fn collect<T>(&mut self, what: &str, n: usize, mut want: impl FnMut(D::Event) -> Option<T>) -> Vec<T> {
        let mut found = Vec::with_capacity(n);
        while found.len() < n {
            let label = format!("{what} ({} of {n})", found.len() + 1);
            found.push(self.wait_for(&label, &mut want).await);
        }
        found
    }

    /// Asserts that for [`QUIET`] no event is `unwanted` and the connection stays up.
    async fn assert_quiet(&mut self, what: &str, unwanted: impl Fn(&D::Event) -> bool) {
        let watched = timeout(QUIET, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(event)) => assert!(!unwanted(&event), "{what}: unexpected {event:?}"),
                    Some(Err(e)) => panic!("{what}: connection error {e:?}"),
                    None => panic!("{what}: the event loop stopped"),
                }
            }
        })
        .await;
        assert!(watched.is_err());
    }

    /// The connection error that ended the event loop.
    async fn closed(&mut self, what: &str) -> D::Error {
        let error = timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return e,
                    None => panic!("{what}: the event loop stopped without an error"),
                }
            }
        })
        .await;
        error.unwrap_or_else(|_| panic!("{what}: still connected after {WAIT:?}"))
    }
}

impl<C, D: Driver> Drop for Conn<C, D> {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

fn payloads(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("m{i}").into_bytes()).collect()
}

// MQTT 3.1.1 helpers.

fn options3(b: &Broker, client_id: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", b.tcp_port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

fn persistent3(b: &Broker, client_id: &str) -> rumqttc::MqttOptions {
    let mut options = options3(b, client_id);
    options.set_clean_session(false);
    options
}

/// Connects and returns the connection and the CONNACK's session present flag.
async fn connect3(options: rumqttc::MqttOptions) -> (Conn3, bool) {
    let (client, events) = rumqttc::AsyncClient::new(options, 1000);
    let mut conn = Conn::start(client, events);
    let present = conn
        .wait_for("CONNACK", |e| match e {
            Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
            _ => None,
        })
        .await;
    (conn, present)
}

async fn subscribe3(c: &mut Conn3, filter: &str, qos: QoS) {
    c.client.subscribe(filter, qos).await.unwrap();
    let codes = c
        .wait_for("SUBACK", |e| match e {
            Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes),
            _ => None,
        })
        .await;
    assert_eq!(codes, [rumqttc::SubscribeReasonCode::Success(qos)], "SUBACK for {filter}");
}

/// Disconnects normally and waits for the broker to close the socket.
async fn leave3(mut c: Conn3) {
    c.client.disconnect().await.unwrap();
    c.closed("DISCONNECT").await;
}

fn publish3(e: Event) -> Option<rumqttc::Publish> {
    match e {
        Event::Incoming(Packet::Publish(p)) => Some(p),
        _ => None,
    }
}

fn is_publish3(e: &Event) -> bool {
    matches!(e, Event::Incoming(Packet::Publish(_)))
}

fn puback3(e: Event) -> Option<()> {
    matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
}

/// Publishes every payload at QoS 1 and waits until all are acknowledged.
async fn publish_acked3(c: &mut Conn3, topic: &str, payloads: &[Vec<u8>]) {
    for payload in payloads {
        c.client.publish(topic, QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
    }
    c.collect("PUBACK", payloads.len(), puback3).await;
}

// MQTT 5 helpers.

fn options5(b: &Broker, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", b.tcp_port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Options for a session that outlives the connection (clean start off, 5 minute expiry).
fn persistent5(b: &Broker, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut options = options5(b, client_id);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(300));
    options
}

async fn connect5(options: rumqttc::v5::MqttOptions) -> (Conn5, bool) {
    let (client, events) = rumqttc::v5::AsyncClient::new(options, 1000);
    let mut conn = Conn::start(client, events);
    let present = conn
        .wait_for("CONNACK", |e| match e {
            rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(ack)) => Some(ack.session_present),
            _ => None,
        })
        .await;
    (conn, present)
}

async fn subscribe5(c: &mut Conn5, filter: &str, qos: QoS5) {
    c.client.subscribe(filter, qos).await.unwrap();
    let codes = c
        .wait_for("SUBACK", |e| match e {
            rumqttc::v5::Event::Incoming(p5::Packet::SubAck(ack)) => Some(ack.return_codes),
            _ => None,
        })
        .await;
    assert_eq!(codes, [p5::SubscribeReasonCode::Success(qos)], "SUBACK for {filter}");
}

async fn leave5(mut c: Conn5) {
    c.client.disconnect().await.unwrap();
    c.closed("DISCONNECT").await;
}

fn publish5(e: rumqttc::v5::Event) -> Option<p5::Publish> {
    match e {
        rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)) => Some(p),
        _ => None,
    }
}

fn is_publish5(e: &rumqttc::v5::Event) -> bool {
    matches!(e, rumqttc::v5::Event::Incoming(p5::Packet::Publish(_)))
}

fn puback5(e: rumqttc::v5::Event) -> Option<p5::PubAckReason> {
    match e {
        rumqttc::v5::Event::Incoming(p5::Packet::PubAck(ack)) => Some(ack.reason),
        _ => None,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8")
}

#[tokio::test]
async fn v311_round_trip_at_every_qos() {
    let b = broker();
    let (mut sub, _) = connect3(options3(&b, "rt3-sub")).await;
    subscribe3(&mut sub, "rt3/+", QoS::ExactlyOnce).await;
    let (mut publisher, _) = connect3(options3(&b, "rt3-pub")).await;
    for qos in QOS {
        publisher.client.publish(format!("rt3/{}", qos as u8), qos, false, vec![qos as u8]).await.unwrap();
    }
    publisher.wait_for("PUBACK for QoS 1", puback3).await;
    publisher.wait_for("PUBCOMP for QoS 2", |e| matches!(e, Event::Incoming(Packet::PubComp(_))).then_some(())).await;
    let mut got = sub.collect("publish", 3, publish3).await;
    got.sort_by_key(|p| p.qos as u8);
    for (p, qos) in got.iter().zip(QOS) {
        assert_eq!((p.topic.clone(), p.qos, p.payload.to_vec()), (format!("rt3/{}", qos as u8), qos, vec![qos as u8]));
    }
    sub.assert_quiet("each message exactly once", is_publish3).await;
}

#[tokio::test]
async fn v5_round_trip_at_every_qos() {
    let b = broker();
    let (mut sub, _) = connect5(options5(&b, "rt5-sub")).await;
    subscribe5(&mut sub, "rt5/+", QoS5::ExactlyOnce).await;
    let (mut publisher, _) = connect5(options5(&b, "rt5-pub")).await;
    for qos in QOS5 {
        publisher.client.publish(format!("rt5/{}", qos as u8), qos, false, vec![qos as u8]).await.unwrap();
    }
    assert_eq!(publisher.wait_for("PUBACK for QoS 1", puback5).await, p5::PubAckReason::Success);
    let completed = publisher
        .wait_for("PUBCOMP for QoS 2", |e| match e {
            rumqttc::v5::Event::Incoming(p5::Packet::PubComp(comp)) => Some(comp.reason),
            _ => None,
        })
        .await;
    assert_eq!(completed, p5::PubCompReason::Success);
    let mut got = sub.collect("publish", 3, publish5).await;
    got.sort_by_key(|p| p.qos as u8);
    for (p, qos) in got.iter().zip(QOS5) {
        assert_eq!((text(&p.topic), p.qos, p.payload.to_vec()), (format!("rt5/{}", qos as u8), qos, vec![qos as u8]));
    }
    sub.assert_quiet("each message exactly once", is_publish5).await;
}

#[tokio::test]
async fn a_thousand_qos1_messages_arrive_in_order_and_none_is_lost() {
    const N: usize = 1000;
    let b = broker();
    let (mut sub3, _) = connect3(options3(&b, "stream-sub3")).await;
    subscribe3(&mut sub3, "stream/#", QoS::AtLeastOnce).await;
    let (mut sub5, _) = connect5(options5(&b, "stream-sub5")).await;
    subscribe5(&mut sub5, "stream/#", QoS5::AtLeastOnce).await;
    let (mut publisher, _) = connect3(options3(&b, "stream-pub")).await;
    let expected = payloads(N);
    publish_acked3(&mut publisher, "stream/x", &expected).await;
    let got3 = sub3.collect("v3 stream", N, |e| publish3(e).map(|p| p.payload.to_vec())).await;
    assert!(got3 == expected, "the MQTT 3.1.1 subscriber got the stream out of order");
    let got5 = sub5.collect("v5 stream", N, |e| publish5(e).map(|p| p.payload.to_vec())).await;
    assert!(got5 == expected, "the MQTT 5 subscriber got the stream out of order");
    sub3.assert_quiet("no duplicates", is_publish3).await;
}

#[tokio::test]
async fn retained_messages_reach_later_subscribers_until_cleared() {
    let b = broker();
    let (mut publisher, _) = connect3(options3(&b, "ret-pub")).await;
    publisher.client.publish("ret/lamp", QoS::AtLeastOnce, true, "on").await.unwrap();
    publisher.wait_for("PUBACK", puback3).await;

    let (mut sub3, _) = connect3(options3(&b, "ret-sub3")).await;
    subscribe3(&mut sub3, "ret/#", QoS::AtLeastOnce).await;
    let p = sub3.wait_for("retained message (v3)", publish3).await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("ret/lamp", &b"on"[..], true));
    let (mut sub5, _) = connect5(options5(&b, "ret-sub5")).await;
    subscribe5(&mut sub5, "ret/#", QoS5::AtLeastOnce).await;
    let p = sub5.wait_for("retained message (v5)", publish5).await;
    assert_eq!((text(&p.topic), &p.payload[..], p.retain), ("ret/lamp".to_string(), &b"on"[..], true));

    // To an established subscription the RETAIN flag is 0 (3.1.1 MQTT-3.3.1-9; MQTT 5 without
    // Retain As Published), and an empty retained message is forwarded like any other.
    for payload in ["off", ""] {
        publisher.client.publish("ret/lamp", QoS::AtLeastOnce, true, payload).await.unwrap();
        publisher.wait_for("PUBACK", puback3).await;
        let p = sub3.wait_for("live message (v3)", publish3).await;
        assert_eq!((&p.payload[..], p.retain), (payload.as_bytes(), false));
        let p = sub5.wait_for("live message (v5)", publish5).await;
        assert_eq!((&p.payload[..], p.retain), (payload.as_bytes(), false));
    }

    let (mut late, _) = connect3(options3(&b, "ret-late")).await;
    subscribe3(&mut late, "ret/#", QoS::AtLeastOnce).await;
    late.assert_quiet("the empty retained message cleared the topic", is_publish3).await;
}

#[tokio::test]
async fn the_will_is_published_when_a_connection_drops_and_not_after_disconnect() {
    let b = broker();
    let (mut sub, _) = connect3(options3(&b, "will-watcher")).await;
    subscribe3(&mut sub, "will/#", QoS::AtLeastOnce).await;

    let mut options = options3(&b, "will-v3");
    options.set_last_will(rumqttc::LastWill::new("will/v3", "v3 gone", QoS::AtLeastOnce, false));
    let (dying3, _) = connect3(options).await;
    let mut options = options5(&b, "will-v5");
    options.set_last_will(p5::LastWill::new("will/v5", "v5 gone", QoS5::AtLeastOnce, false, None));
    let (dying5, _) = connect5(options).await;
    let mut options = options3(&b, "will-polite");
    options.set_last_will(rumqttc::LastWill::new("will/polite", "never sent", QoS::AtLeastOnce, false));
    let (polite, _) = connect3(options).await;

    leave3(polite).await;
    drop(dying3);
    drop(dying5);
    let mut wills = sub.collect("will", 2, |e| publish3(e).map(|p| (p.topic, text(&p.payload)))).await;
    wills.sort();
    assert_eq!(wills, [("will/v3".to_string(), "v3 gone".to_string()), ("will/v5".to_string(), "v5 gone".to_string())]);
    sub.assert_quiet("no will after a normal DISCONNECT", is_publish3).await;
}

#[tokio::test]
async fn a_v311_persistent_session_gets_what_was_published_while_offline() {
    let b = broker();
    let (mut sub, present) = connect3(persistent3(&b, "persist-v3")).await;
    assert!(!present, "a new session");
    subscribe3(&mut sub, "persist/v3", QoS::AtLeastOnce).await;
    leave3(sub).await;

    let (mut publisher, _) = connect3(options3(&b, "persist-v3-pub")).await;
    let sent = payloads(5);
    publish_acked3(&mut publisher, "persist/v3", &sent).await;

    let (mut back, present) = connect3(persistent3(&b, "persist-v3")).await;
    assert!(present, "the session survived the disconnect");
    let got = back.collect("queued message", sent.len(), |e| publish3(e).map(|p| p.payload.to_vec())).await;
    assert_eq!(got, sent);
    back.assert_quiet("nothing more", is_publish3).await;
}

#[tokio::test]
async fn a_v5_persistent_session_gets_what_was_published_while_offline() {
    let b = broker();
    let (mut sub, present) = connect5(persistent5(&b, "persist-v5")).await;
    assert!(!present, "a new session");
    subscribe5(&mut sub, "persist/v5", QoS5::AtLeastOnce).await;
    leave5(sub).await;

    let (mut publisher, _) = connect3(options3(&b, "persist-v5-pub")).await;
    let sent = payloads(5);
    publish_acked3(&mut publisher, "persist/v5", &sent).await;

    let (mut back, present) = connect5(persistent5(&b, "persist-v5")).await;
    assert!(present, "the session survived the disconnect");
    let got = back.collect("queued message", sent.len(), |e| publish5(e).map(|p| p.payload.to_vec())).await;
    assert_eq!(got, sent);
    back.assert_quiet("nothing more", is_publish5).await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let b = broker();
    let (mut first3, _) = connect3(options3(&b, "twin-v3")).await;
    let (mut second3, _) = connect3(options3(&b, "twin-v3")).await;
    // MQTT 3.1.1 has no server DISCONNECT: the first connection is just closed.
    first3.closed("the first v3 connection").await;
    subscribe3(&mut second3, "twin/v3", QoS::AtLeastOnce).await;

    let (mut first5, _) = connect5(options5(&b, "twin-v5")).await;
    let (mut second5, _) = connect5(options5(&b, "twin-v5")).await;
    match first5.closed("the first v5 connection").await {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code: p5::DisconnectReasonCode::SessionTakenOver,
            ..
        }) => {}
        other => panic!("expected DISCONNECT 0x8E (session taken over), got {other:?}"),
    }
    subscribe5(&mut second5, "twin/v5", QoS5::AtLeastOnce).await;
    second3.assert_quiet("the new v3 connection stays", is_publish3).await;
    second5.assert_quiet("the new v5 connection stays", is_publish5).await;
}

#[tokio::test]
async fn a_clean_session_discards_the_stored_one() {
    let b = broker();
    let (mut publisher, _) = connect3(options3(&b, "discard-pub")).await;

    let (mut sub, _) = connect3(persistent3(&b, "discard-v3")).await;
    subscribe3(&mut sub, "discard/v3", QoS::AtLeastOnce).await;
    leave3(sub).await;
    let (mut sub, _) = connect5(persistent5(&b, "discard-v5")).await;
    subscribe5(&mut sub, "discard/v5", QoS5::AtLeastOnce).await;
    leave5(sub).await;
    for topic in ["discard/v3", "discard/v5"] {
        publish_acked3(&mut publisher, topic, &payloads(3)).await;
    }

    let (mut clean3, present3) = connect3(options3(&b, "discard-v3")).await;
    let (mut clean5, present5) = connect5(options5(&b, "discard-v5")).await;
    assert!(!present3 && !present5, "a clean session starts empty");
    // Neither the queued messages nor the subscriptions survive.
    for topic in ["discard/v3", "discard/v5"] {
        publish_acked3(&mut publisher, topic, &payloads(1)).await;
    }
    clean3.assert_quiet("v3 clean session", is_publish3).await;
    clean5.assert_quiet("v5 clean start", is_publish5).await;
}

#[tokio::test]
async fn a_shared_subscription_deals_messages_round_robin() {
    const N: usize = 10;
    let b = broker();
    let (mut worker3, _) = connect3(options3(&b, "worker-v3")).await;
    subscribe3(&mut worker3, "$share/workers/jobs/#", QoS::AtLeastOnce).await;
    let (mut worker5, _) = connect5(options5(&b, "worker-v5")).await;
    subscribe5(&mut worker5, "$share/workers/jobs/#", QoS5::AtLeastOnce).await;
    let (mut publisher, _) = connect3(options3(&b, "jobs-pub")).await;
    let sent = payloads(N);
    publish_acked3(&mut publisher, "jobs/new", &sent).await;

    let mut got = worker3.collect("v3 worker's share", N / 2, |e| publish3(e).map(|p| p.payload.to_vec())).await;
    got.extend(worker5.collect("v5 worker's share", N / 2, |e| publish5(e).map(|p| p.payload.to_vec())).await);
    worker3.assert_quiet("no more than half", is_publish3).await;
    worker5.assert_quiet("no more than half", is_publish5).await;
    got.sort();
    let mut expected = sent;
    expected.sort();
    assert_eq!(got, expected, "every message went to exactly one member");
}

#[tokio::test]
async fn v5_topic_aliases_set_by_the_client_are_resolved() {
    let b = broker();
    let (mut sub5, _) = connect5(options5(&b, "alias-sub5")).await;
    subscribe5(&mut sub5, "alias/#", QoS5::AtLeastOnce).await;
    let (mut sub3, _) = connect3(options3(&b, "alias-sub3")).await;
    subscribe3(&mut sub3, "alias/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = connect5(options5(&b, "alias-pub")).await;
    let sends = [("alias/long/topic/one", 1, "a"), ("", 1, "b"), ("alias/two", 2, "c"), ("", 2, "d"), ("", 1, "e")];
    for (topic, alias, payload) in sends {
        let properties = p5::PublishProperties { topic_alias: Some(alias), ..Default::default() };
        publisher.client.publish_with_properties(topic, QoS5::AtLeastOnce, false, payload, properties).await.unwrap();
    }
    let acks = publisher.collect("PUBACK", sends.len(), puback5).await;
    assert!(acks.iter().all(|r| *r == p5::PubAckReason::Success), "{acks:?}");

    let expected: Vec<(String, String)> = ["one", "one", "two", "two", "one"]
        .iter()
        .zip("abcde".chars())
        .map(|(t, p)| (if *t == "one" { "alias/long/topic/one" } else { "alias/two" }.to_string(), p.to_string()))
        .collect();
    let got5 = sub5
        .collect("v5 delivery", sends.len(), |e| {
            publish5(e).map(|p| {
                let alias = p.properties.as_ref().and_then(|props| props.topic_alias);
                assert_eq!(alias, None, "the subscriber allowed no topic aliases");
                (text(&p.topic), text(&p.payload))
            })
        })
        .await;
    assert_eq!(got5, expected);
    let got3 = sub3.collect("v3 delivery", sends.len(), |e| publish3(e).map(|p| (p.topic, text(&p.payload)))).await;
    assert_eq!(got3, expected);
}

#[tokio::test]
async fn v5_user_properties_and_publish_properties_pass_through() {
    let b = broker();
    let (mut sub5, _) = connect5(options5(&b, "props-sub5")).await;
    subscribe5(&mut sub5, "props/#", QoS5::AtLeastOnce).await;
    let (mut sub3, _) = connect3(options3(&b, "props-sub3")).await;
    subscribe3(&mut sub3, "props/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = connect5(options5(&b, "props-pub")).await;
    let user_properties: Vec<(String, String)> =
        [("site", "plant-7"), ("line", "3"), ("site", "backup")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let sent = p5::PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(b"request-42")),
        user_properties: user_properties.clone(),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    publisher.client.publish_with_properties("props/t", QoS5::AtLeastOnce, false, r#"{"t":21}"#, sent.clone()).await.unwrap();
    publisher.wait_for("PUBACK", puback5).await;

    let p = sub5.wait_for("v5 delivery", publish5).await;
    let got = p.properties.expect("properties were forwarded");
    assert_eq!(got.user_properties, user_properties, "user properties in order, duplicates kept");
    assert_eq!(got, sent);
    let p = sub3.wait_for("v3 delivery", publish3).await;
    assert_eq!(&p.payload[..], br#"{"t":21}"#);
}
