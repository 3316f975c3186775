//! APPLICATION sessions survive a broker restart (subscriptions and queued messages, from the
//! sled session store); DEVICE sessions do not.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Broker, Raw};
use mqttbytes::v5::{self, ConnectReturnCode};
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::V5;

fn persistent_login(client_id: &str, user: &str) -> v5::Connect {
    let mut connect = v5::Connect::new(client_id);
    connect.clean_session = false;
    connect.set_login(user, "pw");
    connect.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(3600),
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    });
    connect
}

/// Connects with a persistent session; returns the client and whether a session was present.
fn connect(broker: &Broker, client_id: &str, user: &str) -> (Raw, bool) {
    let mut c = Raw::socket(broker.tcp.unwrap(), V5);
    c.send_packet(&Packet::Connect(persistent_login(client_id, user)));
    match c.recv() {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ConnectReturnCode::Success, "{client_id}");
            (c, ack.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn stop(mut broker: Broker) {
    let status = Command::new("kill").args(["-TERM", &broker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(broker.wait_for_exit(Duration::from_secs(10)).is_some_and(|s| s.success()), "clean shutdown");
}

#[test]
fn application_sessions_survive_a_restart_and_device_sessions_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let hash = rampart_node::auth::password::hash("pw").unwrap();
    let state = format!(
        r#"
[[credentials]]
name = "app"
client_type = "APPLICATION"
password = {{ username = "app", hash = "{hash}" }}
rules = [{{ access = "read", pattern = "jobs/#" }}]

[[credentials]]
name = "dev"
password = {{ username = "dev", hash = "{hash}" }}
rules = [{{ access = "read", pattern = "jobs/#" }}]

[defaults]
anonymous = true
anonymous_rules = [{{ access = "write", pattern = "jobs/#" }}]
"#
    );
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, state).unwrap();
    let config = format!("[node]\ndata_dir = {:?}\n[auth]\nstate_file = {state_file:?}\n", dir.path().join("data"));

    let first = Broker::start_with(&config, 0);
    for (client_id, user) in [("app-1", "app"), ("dev-1", "dev")] {
        let (mut c, present) = connect(&first, client_id, user);
        assert!(!present);
        let mut subscribe = v5::Subscribe::new("jobs/#", QoS::AtLeastOnce);
        subscribe.pkid = 1;
        c.send_packet(&Packet::Subscribe(subscribe));
        assert!(matches!(c.recv(), Some(Packet::SubAck(_))));
        c.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
        c.expect_close(None);
    }
    let mut publisher = Raw::connect(first.tcp.unwrap(), V5, "publisher");
    for i in 1..=3u16 {
        let mut p = v5::Publish::new("jobs/build", QoS::AtLeastOnce, format!("job {i}"));
        p.pkid = i;
        publisher.send_packet(&Packet::Publish(p));
        assert!(matches!(publisher.recv(), Some(Packet::PubAck(a)) if a.pkid == i));
    }
    drop(publisher);
    stop(first);

    let second = Broker::start_with(&config, 0);
    let (mut app, present) = connect(&second, "app-1", "app");
    assert!(present, "the APPLICATION session survived the restart");
    let mut got = Vec::new();
    while got.len() < 3 {
        match app.recv() {
            Some(Packet::Publish(p)) => {
                app.send_packet(&Packet::PubAck(v5::PubAck::new(p.pkid)));
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            other => panic!("expected a queued message, got {other:?}"),
        }
    }
    assert_eq!(got, ["job 1", "job 2", "job 3"]);
    let (_dev, present) = connect(&second, "dev-1", "dev");
    assert!(!present, "DEVICE sessions are kept in memory only");
}

fn kill_9(mut broker: Broker) {
    let status = Command::new("kill").args(["-KILL", &broker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(broker.wait_for_exit(Duration::from_secs(10)).is_some(), "killed");
}

fn application_config(dir: &std::path::Path) -> String {
    let hash = rampart_node::auth::password::hash("pw").unwrap();
    let state = format!(
        r#"
[[credentials]]
name = "app"
client_type = "APPLICATION"
password = {{ username = "app", hash = "{hash}" }}
rules = [{{ access = "readWrite", pattern = "jobs/#" }}]

[defaults]
anonymous = true
anonymous_rules = [{{ access = "write", pattern = "jobs/#" }}]
"#
    );
    let state_file = dir.join("auth.toml");
    std::fs::write(&state_file, state).unwrap();
    format!(
        "[node]\ndata_dir = {:?}\n[auth]\nstate_file = {state_file:?}\n[limits]\napplication_max_queued_messages = 20000\n",
        dir.join("data")
    )
}

/// Leaves an APPLICATION session offline, subscribed to `jobs/#` at QoS `qos`.
fn leave_subscribed(broker: &Broker, qos: QoS) {
    let (mut app, _) = connect(broker, "app-1", "app");
    let mut subscribe = v5::Subscribe::new("jobs/#", qos);
    subscribe.pkid = 1;
    app.send_packet(&Packet::Subscribe(subscribe));
    assert!(matches!(app.recv(), Some(Packet::SubAck(_))));
    app.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
    app.expect_close(None);
}

#[test]
fn acknowledged_qos1_messages_for_an_offline_session_survive_kill_9_in_order() {
    const MESSAGES: u16 = 10_000;
    const WINDOW: u16 = 100;
    let dir = tempfile::tempdir().unwrap();
    let config = application_config(dir.path());
    let first = Broker::start_with(&config, 0);
    leave_subscribed(&first, QoS::AtLeastOnce);
    let mut publisher = Raw::connect(first.tcp.unwrap(), V5, "publisher");
    for start in (1..=MESSAGES).step_by(WINDOW as usize) {
        let batch = start..(start + WINDOW).min(MESSAGES + 1);
        for i in batch.clone() {
            let mut p = v5::Publish::new("jobs/build", QoS::AtLeastOnce, i.to_string());
            p.pkid = i;
            publisher.send_packet(&Packet::Publish(p));
        }
        for i in batch {
            assert!(matches!(publisher.recv(), Some(Packet::PubAck(a)) if a.pkid == i), "PUBACK {i}");
        }
    }
    // Every message is acknowledged: the node dies without any chance to save more.
    kill_9(first);

    let second = Broker::start_with(&config, 0);
    let (mut app, present) = connect(&second, "app-1", "app");
    assert!(present, "the session survived kill -9; broker log:\n{}", second.logs.try_iter().collect::<Vec<_>>().join("\n"));
    for expected in 1..=MESSAGES {
        match app.recv() {
            Some(Packet::Publish(p)) => {
                assert_eq!(String::from_utf8(p.payload.to_vec()).unwrap(), expected.to_string(), "in order, once");
                app.send_packet(&Packet::PubAck(v5::PubAck::new(p.pkid)));
            }
            other => panic!("expected message {expected}, got {other:?}"),
        }
    }
    app.send_packet(&Packet::PingReq);
    assert!(matches!(app.recv(), Some(Packet::PingResp)), "nothing more: each message exactly once");
}

#[test]
fn qos2_is_delivered_exactly_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = application_config(dir.path());
    let first = Broker::start_with(&config, 0);
    leave_subscribed(&first, QoS::ExactlyOnce);
    let mut publisher = Raw::connect(first.tcp.unwrap(), V5, "publisher");
    for (pkid, payload) in [(1u16, "first"), (2, "second")] {
        let mut p = v5::Publish::new("jobs/build", QoS::ExactlyOnce, payload);
        p.pkid = pkid;
        publisher.send_packet(&Packet::Publish(p));
        assert!(matches!(publisher.recv(), Some(Packet::PubRec(r)) if r.pkid == pkid));
        publisher.send_packet(&Packet::PubRel(v5::PubRel::new(pkid)));
        assert!(matches!(publisher.recv(), Some(Packet::PubComp(c)) if c.pkid == pkid));
    }
    kill_9(first);

    // The subscriber, one message in flight at a time, takes the first message halfway
    // (PUBREC sent), then leaves.
    let second = Broker::start_with(&config, 0);
    let mut app = Raw::socket(second.tcp.unwrap(), V5);
    let mut login = persistent_login("app-1", "app");
    login.properties.as_mut().unwrap().receive_maximum = Some(1);
    app.send_packet(&Packet::Connect(login));
    assert!(matches!(app.recv(), Some(Packet::ConnAck(a)) if a.session_present));
    let first_pkid = match app.recv() {
        Some(Packet::Publish(p)) if &p.payload[..] == b"first" && p.qos == QoS::ExactlyOnce => p.pkid,
        other => panic!("expected the first message, got {other:?}"),
    };
    app.send_packet(&Packet::PubRec(v5::PubRec::new(first_pkid)));
    assert!(matches!(app.recv(), Some(Packet::PubRel(r)) if r.pkid == first_pkid));
    app.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
    drop(app);
    std::thread::sleep(Duration::from_millis(300));
    kill_9(second);

    // After the second kill, the broker resumes the QoS 2 exchange where it was: PUBREL for the
    // first message (never the message again), then the second message once.
    let third = Broker::start_with(&config, 0);
    let (mut app, present) = connect(&third, "app-1", "app");
    assert!(present);
    let mut seen = Vec::new();
    loop {
        match app.recv() {
            Some(Packet::PubRel(r)) => {
                assert_eq!(r.pkid, first_pkid);
                app.send_packet(&Packet::PubComp(v5::PubComp::new(r.pkid)));
                seen.push("PUBREL first".to_string());
            }
            Some(Packet::Publish(p)) => {
                seen.push(String::from_utf8(p.payload.to_vec()).unwrap());
                app.send_packet(&Packet::PubRec(v5::PubRec::new(p.pkid)));
            }
            None => break,
            other => panic!("unexpected {other:?}"),
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, ["PUBREL first", "second"]);
}
