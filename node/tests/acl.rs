//! Authorization over mutual TLS, on raw connections with exact reason codes: credentials,
//! roles and rules from the state file, unknown and disabled identities, unauthorized publish
//! and subscribe in MQTT 3.1.1 and 5.0, wills, and revocation of a connected client on SIGHUP.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Broker, Raw};
use mqttbytes::v5::{self, ConnectReturnCode, DisconnectReasonCode};
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::{self, V311, V5};
use rampart_node::pki::{Kind, Store};

const STATE: &str = r#"
[[roles]]
name = "telemetry"
rules = [{ access = "write", pattern = "cpi/%u/telemetry" }]

[[credentials]]
name = "plc-1"
roles = ["telemetry"]
x509 = { identity = "plc-1" }
rules = [{ access = "read", pattern = "cpi/%u/commands" }]

[[credentials]]
name = "plc-3"
enabled = false
x509 = { identity = "plc-3" }
"#;

/// A password credential `dashboard` / `s3cret` that may read `devices/#`.
fn password_credential() -> String {
    let hash = rampart_node::auth::password::hash("s3cret").unwrap();
    format!(
        "\n[[credentials]]\nname = \"dashboard\"\npassword = {{ username = \"dashboard\", hash = \"{hash}\" }}\nrules = [{{ access = \"read\", pattern = \"devices/#\" }}]\n"
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
    state_file: PathBuf,
    broker: Broker,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("pki"));
    store.init_ca("ACL Test CA", 30, rampart_node::pki::CaKey::EcdsaP256).unwrap();
    store.issue(Kind::Server, "localhost", &["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    for device in ["plc-1", "plc-2", "plc-3"] {
        store.issue(Kind::Device, device, &[], 30).unwrap();
    }
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, format!("{STATE}{}", password_credential())).unwrap();
    let (cert, key) = store.paths(Kind::Server, "localhost");
    let config = format!(
        "[auth]\nstate_file = {state_file:?}\n[listeners.tls]\nbind = \"127.0.0.1:0\"\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_certificate = \"required\"\nca_file = {:?}\n",
        store.ca_cert()
    );
    let broker = Broker::start_with(&config, 1);
    Setup { _dir: dir, store, state_file, broker }
}

impl Setup {
    fn client(&self, version: ProtocolVersion, device: &str) -> Raw {
        let (cert, key) = self.store.paths(Kind::Device, device);
        Raw::tls(self.broker.tls.unwrap(), version, &self.store.ca_cert(), (&cert, &key))
    }

    fn connected(&self, version: ProtocolVersion, device: &str) -> Raw {
        let mut c = self.client(version, device);
        c.handshake(device);
        c
    }
}

fn publish(topic: &str, qos: QoS, pkid: u16) -> Packet {
    let mut p = v5::Publish::new(topic, qos, "x");
    p.pkid = pkid;
    Packet::Publish(p)
}

fn subscribe(filters: &[&str]) -> Packet {
    let mut s = v5::Subscribe::new(filters[0], QoS::AtLeastOnce);
    s.pkid = 1;
    s.filters.extend(filters[1..].iter().map(|f| v5::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)));
    Packet::Subscribe(s)
}

#[test]
fn permitted_topics_work_and_others_are_refused_per_version() {
    let s = setup();
    let mut v5c = s.connected(V5, "plc-1");
    v5c.send_packet(&publish("cpi/plc-1/telemetry", QoS::AtLeastOnce, 1));
    assert!(matches!(v5c.recv(), Some(Packet::PubAck(a)) if a.reason == v5::PubAckReason::Success));
    v5c.send_packet(&publish("cpi/plc-2/telemetry", QoS::AtLeastOnce, 2));
    assert!(matches!(v5c.recv(), Some(Packet::PubAck(a)) if a.pkid == 2 && a.reason == v5::PubAckReason::NotAuthorized));
    v5c.send_packet(&publish("cpi/plc-2/telemetry", QoS::AtMostOnce, 0));
    v5c.send_packet(&Packet::PingReq);
    assert_eq!(v5c.recv(), Some(Packet::PingResp), "an MQTT 5 client stays connected");
    assert!(s.broker.metric("rampart_messages_dropped_total{reason=\"not_authorized\"}") >= 2);
    let logged = s.broker.wait_for_log("PUBLISH not authorized", Duration::from_secs(5)).expect("the refusal is logged");
    assert!(logged.contains("plc-1") && logged.contains("cpi/plc-2/telemetry"), "{logged}");

    // A filter with a readable topic under it is granted (the others are withheld at delivery);
    // one with none is refused.
    v5c.send_packet(&subscribe(&["cpi/plc-1/commands", "cpi/+/commands", "other/#"]));
    match v5c.recv() {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [v5::SubscribeReasonCode::QoS1, v5::SubscribeReasonCode::QoS1, v5::SubscribeReasonCode::NotAuthorized]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let mut v3c = s.connected(V311, "plc-1");
    v3c.send_packet(&subscribe(&["cpi/plc-1/commands", "cpi/plc-2/commands"]));
    match v3c.recv() {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.return_codes, [v5::SubscribeReasonCode::QoS1, v5::SubscribeReasonCode::Unspecified]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    v3c.send_packet(&publish("cpi/plc-2/telemetry", QoS::AtLeastOnce, 3));
    v3c.expect_close(None);
}

#[test]
fn unknown_and_disabled_identities_are_not_authorized() {
    let s = setup();
    for version in [V311, V5] {
        for device in ["plc-2", "plc-3"] {
            let mut c = s.client(version, device);
            assert_eq!(c.connack(device), ConnectReturnCode::NotAuthorized, "{device} over {version:?}");
        }
    }
}

#[test]
fn a_will_to_a_forbidden_topic_is_not_published() {
    let s = setup();
    let mut watcher = s.connected(V5, "plc-1");
    watcher.send_packet(&subscribe(&["cpi/plc-1/commands"]));
    assert!(matches!(watcher.recv(), Some(Packet::SubAck(_))));
    let mut doomed = s.client(V5, "plc-1");
    let mut connect = v5::Connect::new("plc-1-doomed");
    connect.last_will = Some(v5::LastWill::new("cpi/plc-1/commands", "will", QoS::AtMostOnce, false));
    doomed.send_packet(&Packet::Connect(connect));
    assert!(matches!(doomed.recv(), Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success));
    assert!(s.broker.wait_for_log("will not accepted", Duration::from_secs(5)).is_some());
    drop(doomed);
    watcher.send_packet(&Packet::PingReq);
    assert_eq!(watcher.recv(), Some(Packet::PingResp), "no will arrived");
}

#[test]
fn revoking_a_connected_certificate_disconnects_it_on_reload() {
    let s = setup();
    let mut live = s.connected(V5, "plc-1");
    let in_use = std::fs::read(s.store.paths(Kind::Device, "plc-1").0).unwrap();
    let serial = rampart_node::pki::serial_of(&rampart_node::pki::pem_to_der(&in_use).unwrap()).unwrap();
    s.store.issue(Kind::Device, "plc-1", &[], 30).unwrap();
    let revocation =
        format!("\n[[revocations]]\nissuer = \"O=Rampart, CN=ACL Test CA\"\nserial = \"{serial}\"\nreason = \"keyCompromise\"\n");
    std::fs::write(&s.state_file, format!("{STATE}{}{revocation}", password_credential())).unwrap();
    let status = Command::new("kill").args(["-HUP", &s.broker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    match live.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, DisconnectReasonCode::AdministrativeAction),
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    let mut fresh = s.connected(V5, "plc-1");
    fresh.send_packet(&Packet::PingReq);
    assert_eq!(fresh.recv(), Some(Packet::PingResp), "the new certificate of plc-1 still works");
}

#[test]
fn a_broken_state_file_on_reload_keeps_the_previous_state() {
    let s = setup();
    std::fs::write(&s.state_file, "[[credentials]]\nname = 1\n").unwrap();
    let status = Command::new("kill").args(["-HUP", &s.broker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let line = s.broker.wait_for_log("not reloaded", Duration::from_secs(5)).expect("an error is logged");
    assert!(line.contains("credentials"), "{line}");
    s.connected(V5, "plc-1");
}

#[test]
fn password_and_anonymous_clients_over_plain_tcp() {
    let s = setup();
    let tcp = s.broker.tcp.unwrap();
    let login = |user: &str, password: &str| {
        let mut c = v5::Connect::new(format!("{user}-client"));
        c.set_login(user, password);
        c
    };
    for version in [V311, V5] {
        let code = |connect: v5::Connect| Raw::socket(tcp, version).connack_with(connect);
        assert_eq!(code(login("dashboard", "s3cret")), ConnectReturnCode::Success);
        assert_eq!(code(login("dashboard", "wrong")), ConnectReturnCode::BadUserNamePassword);
        assert_eq!(code(login("nobody", "s3cret")), ConnectReturnCode::BadUserNamePassword);
        assert_eq!(code(login("plc-1", "s3cret")), ConnectReturnCode::BadUserNamePassword, "a certificate-only identity has no password");
        assert_eq!(code(v5::Connect::new("anonymous")), ConnectReturnCode::NotAuthorized, "no anonymous clients by default");
    }
    let mut dashboard = Raw::socket(tcp, V5);
    assert_eq!(dashboard.connack_with(login("dashboard", "s3cret")), ConnectReturnCode::Success);
    dashboard.send_packet(&subscribe(&["devices/#", "cpi/#"]));
    match dashboard.recv() {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.return_codes, [v5::SubscribeReasonCode::QoS1, v5::SubscribeReasonCode::NotAuthorized]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}
