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
