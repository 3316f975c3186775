//! Exploit tests for issue 8 ("a session belongs to its principal"): one test per authorization
//! defect, each asserting the behaviour the issue asks for, against the real `rampart` binary on
//! raw MQTT connections (plain TCP for anonymous clients, mutual TLS for devices).
//!
//! Written before the fix: they fail on the current broker for the reason their name gives.
//! Run them with `cargo test -p rampart-node --test session_ownership`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Broker, Raw};
use mqttbytes::v5::{self, ConnectReturnCode, DisconnectReasonCode, PubAckReason, SubscribeReasonCode};
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::{self, V311, V5};
use rampart_node::pki::{Kind, Store};

const CA_NAME: &str = "Ownership Test CA";

/// Every device certificate is covered by this credential: `devices/<identity>/#`.
const DEVICES: &str = r#"
[[credentials]]
name = "devices"
x509 = { identity_regex = "device-[0-9]+" }
rules = [{ access = "readWrite", pattern = "devices/%u/#" }]
"#;

/// A PKI (devices `device-1`, `device-2`, `device-10`), a state file, and a broker with a plain
/// TCP listener and a TLS listener that requires a client certificate.
struct Fleet {
    _dir: tempfile::TempDir,
    store: Store,
    state_file: PathBuf,
    broker: Broker,
}

/// `state` is the auth state file; `auth` extra keys for the `[auth]` section of the config.
fn fleet(state: &str, auth: &str) -> Fleet {
    rampart_node::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("pki"));
    store.init_ca(CA_NAME, 30, rampart_node::pki::CaKey::EcdsaP256).unwrap();
    store.issue(Kind::Server, "localhost", &["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    for device in ["device-1", "device-2", "device-10"] {
        store.issue(Kind::Device, device, &[], 30).unwrap();
    }
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, state).unwrap();
    let (cert, key) = store.paths(Kind::Server, "localhost");
    let config = format!(
        "[auth]\nstate_file = {state_file:?}\n{auth}\n[listeners.tls]\nbind = \"127.0.0.1:0\"\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_certificate = \"required\"\nca_file = {:?}\n",
        store.ca_cert()
    );
    let broker = Broker::start_with(&config, 1);
    Fleet { _dir: dir, store, state_file, broker }
}

impl Fleet {
    /// A TLS connection presenting `device`'s certificate (nothing sent yet).
    fn device(&self, version: ProtocolVersion, device: &str) -> Client {
        let (cert, key) = self.store.paths(Kind::Device, device);
        Raw::tls(self.broker.tls.unwrap(), version, &self.store.ca_cert(), (&cert, &key)).into()
    }

    /// A TLS connection for `device` with a clean session under `client_id`, CONNACK checked.
    fn connected(&self, version: ProtocolVersion, device: &str, client_id: &str) -> Client {
        let mut c = self.device(version, device);
        let ack = connack(&mut c, clean(client_id));
        assert_eq!(ack.code, ConnectReturnCode::Success, "setup: {device} as {client_id}");
        c
    }

    /// A plain TCP connection without certificate (nothing sent yet).
    fn anonymous(&self, version: ProtocolVersion) -> Client {
        Raw::socket(self.broker.tcp.unwrap(), version).into()
    }

    /// Replaces the state file and has the broker re-read it (SIGHUP).
    fn reload(&self, state: &str) {
        std::fs::write(&self.state_file, state).unwrap();
        let status = Command::new("kill").args(["-HUP", &self.broker.pid().to_string()]).status().unwrap();
        assert!(status.success());
        self.broker.wait_for_log("authorization state reloaded", Duration::from_secs(10)).expect("setup: the state is reloaded");
    }

    /// A `[[revocations]]` entry for the certificate `device` holds now.
    fn revocation_of(&self, device: &str) -> String {
        let pem = std::fs::read(self.store.paths(Kind::Device, device).0).unwrap();
        let serial = rampart_node::pki::serial_of(&rampart_node::pki::pem_to_der(&pem).unwrap()).unwrap();
        format!("\n[[revocations]]\nissuer = \"O=Rampart, CN={CA_NAME}\"\nserial = \"{serial}\"\nreason = \"keyCompromise\"\n")
    }
}

/// CONNECT with a clean session.
fn clean(client_id: &str) -> v5::Connect {
    let mut c = v5::Connect::new(client_id);
    c.keep_alive = 60;
    c
}

/// CONNECT asking to keep / resume the session (clean session 0; an hour of expiry in MQTT 5).
fn persistent(version: ProtocolVersion, client_id: &str) -> v5::Connect {
    let mut c = clean(client_id);
    c.clean_session = false;
    if version == V5 {
        c.properties = Some(v5::ConnectProperties {
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
    }
    c
}

/// A raw MQTT connection that keeps the messages it received while waiting for an answer.
struct Client {
    raw: Raw,
    /// Topics of messages received and not yet returned by [`delivered`].
    inbox: Vec<String>,
}

impl From<Raw> for Client {
    fn from(raw: Raw) -> Client {
        Client { raw, inbox: Vec::new() }
    }
}

impl Client {
    fn send_packet(&mut self, packet: &Packet) {
        self.raw.send_packet(packet);
    }

    /// The next packet other than a PUBLISH (acknowledged and kept in the inbox), or `None`
    /// when the broker closed the connection.
    fn recv(&mut self) -> Option<Packet> {
        loop {
            match self.raw.recv() {
                Some(Packet::Publish(p)) => {
                    if p.qos == QoS::AtLeastOnce {
                        self.raw.send_packet(&Packet::PubAck(v5::PubAck::new(p.pkid)));
                    }
                    self.inbox.push(p.topic);
                }
                other => return other,
            }
        }
    }
}

/// Sends `connect` and returns the CONNACK.
fn connack(c: &mut Client, connect: v5::Connect) -> v5::ConnAck {
    c.send_packet(&Packet::Connect(connect));
    match c.recv() {
        Some(Packet::ConnAck(ack)) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Subscribes to each filter at QoS 1 in one SUBSCRIBE; returns the SUBACK codes.
fn subscribe(c: &mut Client, filters: &[&str]) -> Vec<SubscribeReasonCode> {
    let mut s = v5::Subscribe::new(filters[0], QoS::AtLeastOnce);
    s.pkid = 7;
    s.filters.extend(filters[1..].iter().map(|f| v5::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)));
    c.send_packet(&Packet::Subscribe(s));
    match c.recv() {
        Some(Packet::SubAck(ack)) => ack.return_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Publishes at QoS 1 and returns the PUBACK reason (MQTT 3.1.1: success, or `None` when the
/// broker closed the connection).
fn publish(c: &mut Client, topic: &str, retain: bool) -> Option<PubAckReason> {
    let mut p = v5::Publish::new(topic, QoS::AtLeastOnce, "payload");
    p.pkid = 9;
    p.retain = retain;
    c.send_packet(&Packet::Publish(p));
    match c.recv() {
        Some(Packet::PubAck(a)) if a.pkid == 9 => Some(a.reason),
        None => None,
        Some(other) => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The topics of every message the broker delivered to `c` so far: those received while waiting
/// for other answers, and those that arrive before the broker answers two PINGREQs in a row
/// (messages routed before the call are written before the second PINGRESP).
fn delivered(c: &mut Client) -> Vec<String> {
    for _ in 0..2 {
        c.send_packet(&Packet::PingReq);
        match c.recv() {
            Some(Packet::PingResp) | None => {}
            Some(other) => panic!("unexpected packet {other:?}"),
        }
    }
    std::mem::take(&mut c.inbox)
}

/// Disconnects normally and waits until the broker has put the session offline.
fn leave(fleet: &Fleet, mut c: Client) {
    c.send_packet(&Packet::Disconnect(v5::Disconnect::new()));
    assert!(c.recv().is_none(), "setup: the connection closes after DISCONNECT");
    fleet.broker.wait_for_log("client disconnected", Duration::from_secs(5)).expect("setup: the session goes offline");
}

/// Defect: any principal that names a client id resumes its session. An anonymous client on
/// the TCP listener asking for device-1's persistent session must be refused (CONNACK not
/// authorized), never be told `session present`, and never receive device-1's messages; device-1
/// itself then still resumes it.
#[test]
fn session_resume_across_principals_is_refused() {
    for version in [V311, V5] {
        let f = fleet(&format!("[defaults]\nanonymous = true\n{DEVICES}"), "");
        let mut owner = f.device(version, "device-1");
        let ack = connack(&mut owner, persistent(version, "device-1"));
        assert_eq!(ack.code, ConnectReturnCode::Success, "setup: device-1 connects");
        assert_eq!(subscribe(&mut owner, &["devices/device-1/#"]), [SubscribeReasonCode::QoS1], "setup");
        leave(&f, owner);

        let mut intruder = f.anonymous(version);
        let ack = connack(&mut intruder, persistent(version, "device-1"));
        let mut publisher = f.connected(V5, "device-1", "device-1-pub");
        assert_eq!(publish(&mut publisher, "devices/device-1/secret", false), Some(PubAckReason::Success), "setup");
        let leaked = if ack.code == ConnectReturnCode::Success { delivered(&mut intruder) } else { Vec::new() };
        assert!(
            ack.code == ConnectReturnCode::NotAuthorized && !ack.session_present && leaked.is_empty(),
            "{version:?}: an anonymous client asking for device-1's session got CONNACK {:?} with session present = {} and \
             received {leaked:?}; it must get CONNACK not authorized, no session, no message",
            ack.code,
            ack.session_present
        );
        drop(intruder);

        let mut owner = f.device(version, "device-1");
        let ack = connack(&mut owner, persistent(version, "device-1"));
        assert!(ack.code == ConnectReturnCode::Success && ack.session_present, "{version:?}: device-1 resumes its own session: {ack:?}");
        assert_eq!(delivered(&mut owner), ["devices/device-1/secret"], "{version:?}: the queued message reaches device-1");
    }
}

/// Defect: under the default `prefix` client-id policy, `device-1`'s certificate may use client
/// id `device-10` and so resumes device-10's offline session. Prefix must mean the identity
/// exactly or the identity followed by `-`.
#[test]
fn prefix_client_id_policy_does_not_let_device_1_claim_device_10() {
    let f = fleet(DEVICES, "");
    let mut victim = f.device(V311, "device-10");
    assert_eq!(connack(&mut victim, persistent(V311, "device-10")).code, ConnectReturnCode::Success, "setup");
    assert_eq!(subscribe(&mut victim, &["devices/device-10/#"]), [SubscribeReasonCode::QoS1], "setup");
    leave(&f, victim);

    let mut intruder = f.device(V311, "device-1");
    let ack = connack(&mut intruder, persistent(V311, "device-10"));
    let mut publisher = f.connected(V5, "device-10", "device-10-pub");
    assert_eq!(publish(&mut publisher, "devices/device-10/secret", false), Some(PubAckReason::Success), "setup");
    let leaked = if ack.code == ConnectReturnCode::Success { delivered(&mut intruder) } else { Vec::new() };
    assert!(
        ack.code == ConnectReturnCode::NotAuthorized && !ack.session_present && leaked.is_empty(),
        "device-1's certificate with client id device-10 got CONNACK {:?} with session present = {} and received \
         {leaked:?}; it must get CONNACK not authorized (prefix = identity or identity + '-')",
        ack.code,
        ack.session_present
    );
    drop(intruder);
    // Issue 28, 3: the refusal's log line names the client id it asked for.
    let line = f.broker.wait_for_log("connection refused", Duration::from_secs(5)).expect("the refusal is logged");
    assert!(line.contains("client_id=\"device-10\"") || line.contains("client_id=device-10"), "{line}");

    for client_id in ["device-1", "device-1-telemetry"] {
        let mut own = f.device(V311, "device-1");
        assert_eq!(connack(&mut own, clean(client_id)).code, ConnectReturnCode::Success, "device-1 may use {client_id}");
    }
}

/// Defect: `%c` is substituted unescaped into `pattern` rules, so client id `#` turns
/// `clients/%c/#` into `clients/#/#` (every client's topics), `+` into `clients/+/#`, and a
/// client id with `/` reaches into another client's subtree. Such a value must make the rule
/// not match.
#[test]
fn client_id_wildcards_in_percent_c_do_not_widen_a_pattern_rule() {
    let state = "[defaults]\nanonymous = true\nanonymous_rules = [{ access = \"readWrite\", pattern = \"clients/%c/#\" }]\n";
    let f = fleet(state, "");
    let mut victim = f.anonymous(V5);
    assert_eq!(connack(&mut victim, clean("other")).code, ConnectReturnCode::Success, "setup");
    assert_eq!(subscribe(&mut victim, &["clients/other/#"]), [SubscribeReasonCode::QoS1], "setup: the rule works");

    let mut failures = Vec::new();
    for (n, evil) in ["#", "+", "other/x"].into_iter().enumerate() {
        let mut attacker = f.anonymous(V5);
        assert_eq!(connack(&mut attacker, clean(evil)).code, ConnectReturnCode::Success, "setup: client id {evil:?}");
        let codes = subscribe(&mut attacker, &["clients/#", "clients/other/#", "clients/other/x/#"]);
        let forged = format!("clients/other/x/forged-{n}");
        let puback = publish(&mut attacker, &forged, false);
        let private = format!("clients/other/x/private-{n}");
        assert_eq!(publish(&mut victim, &private, false), Some(PubAckReason::Success), "setup");
        let read = delivered(&mut attacker);
        let forged_arrived = delivered(&mut victim).contains(&forged);
        if puback != Some(PubAckReason::NotAuthorized) || forged_arrived || !read.is_empty() {
            failures.push(format!(
                "client id {evil:?}: SUBACK {codes:?}; PUBACK for {forged} {puback:?} (delivered to `other`: {forged_arrived}); \
                 read other's messages {read:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "rule clients/%c/# widened by the client id:\n{}", failures.join("\n"));
}

/// Defect: with `use_identity_as_username = false`, `%u` of a certificate client is the user
/// name it sent. device-1 sending user name `device-2` must not gain `devices/device-2/#`; its
/// `%u` is its identity.
#[test]
fn percent_u_of_a_certificate_client_is_its_identity_not_the_user_name_it_sent() {
    let f = fleet(DEVICES, "use_identity_as_username = false");
    let mut spoofer = f.device(V5, "device-1");
    let mut connect = clean("device-1");
    connect.set_login("device-2", "anything");
    assert_eq!(connack(&mut spoofer, connect).code, ConnectReturnCode::Success, "setup");
    let codes = subscribe(&mut spoofer, &["devices/device-2/#", "devices/device-1/#"]);
    let puback = publish(&mut spoofer, "devices/device-2/forged", false);
    let mut owner = f.connected(V5, "device-2", "device-2-pub");
    assert_eq!(publish(&mut owner, "devices/device-2/command", false), Some(PubAckReason::Success), "setup");
    let read = delivered(&mut spoofer);
    assert!(
        codes == [SubscribeReasonCode::NotAuthorized, SubscribeReasonCode::QoS1]
            && puback == Some(PubAckReason::NotAuthorized)
            && !read.iter().any(|t| t.starts_with("devices/device-2/")),
        "device-1 sending user name device-2: SUBACK [devices/device-2/#, devices/device-1/#] = {codes:?} (want \
         [NotAuthorized, QoS1]); PUBACK devices/device-2/forged = {puback:?} (want NotAuthorized); read {read:?}"
    );
}

/// Defect: `topic_regex` rules are matched against the literal SUBSCRIBE filter, so a read deny
/// `plant/secret/.*` does not stop `plant/#`, and secrets are delivered. The subscription may be
/// granted, but `plant/secret/x` must be withheld while `plant/line-1` is delivered.
#[test]
fn topic_regex_deny_withholds_matching_topics_from_a_granted_wildcard() {
    let state = r#"
[[credentials]]
name = "reader"
x509 = { identity = "device-1" }
rules = [{ access = "read", pattern = "plant/#" }, { access = "read", topic_regex = "plant/secret/.*", deny = true }]

[[credentials]]
name = "writer"
x509 = { identity = "device-2" }
rules = [{ access = "write", pattern = "plant/#" }]
"#;
    let f = fleet(state, "");
    let mut reader = f.connected(V5, "device-1", "device-1");
    let codes = subscribe(&mut reader, &["plant/#"]);
    let mut writer = f.connected(V5, "device-2", "device-2");
    for topic in ["plant/secret/x", "plant/line-1"] {
        assert_eq!(publish(&mut writer, topic, false), Some(PubAckReason::Success), "setup");
    }
    let read = delivered(&mut reader);
    assert!(!read.iter().any(|t| t.starts_with("plant/secret/")), "a topic the reader may not read was delivered: {read:?}");
    assert_eq!(codes, [SubscribeReasonCode::QoS1], "plant/# has readable topics, so it is granted");
    assert_eq!(read, ["plant/line-1"]);
}

/// Defect: read permission is checked when a filter is subscribed, never for the message
/// delivered — retained messages included. A retained message on a topic the subscriber may not
/// read is never replayed, whatever the granted filter.
#[test]
fn retained_messages_on_unreadable_topics_are_never_delivered() {
    let state = r#"
[[credentials]]
name = "reader"
x509 = { identity = "device-1" }
rules = [{ access = "read", pattern = "vault/#" }, { access = "read", topic_regex = "vault/secret/.*", deny = true }]

[[credentials]]
name = "writer"
x509 = { identity = "device-2" }
rules = [{ access = "write", pattern = "vault/#" }]
"#;
    let f = fleet(state, "");
    let mut writer = f.connected(V5, "device-2", "device-2");
    for topic in ["vault/secret/key", "vault/public"] {
        assert_eq!(publish(&mut writer, topic, true), Some(PubAckReason::Success), "setup");
    }
    let mut reader = f.connected(V5, "device-1", "device-1");
    let mut read = Vec::new();
    for filter in ["vault/#", "vault/+/key"] {
        let codes = subscribe(&mut reader, &[filter]);
        read.extend(delivered(&mut reader).into_iter().map(|t| format!("{filter} ({codes:?}) -> {t}")));
    }
    assert!(!read.iter().any(|t| t.ends_with("vault/secret/key")), "the retained secret was replayed: {read:?}");
    assert!(read.iter().any(|t| t.ends_with("-> vault/public")), "the readable retained message is replayed: {read:?}");
}

/// Defect (same class, on a rule change): when a reload (SIGHUP) adds a read deny on `line/secret`,
/// the existing subscription `line/#` is dropped whole today. It must stay (it still has readable
/// topics) and the new rules must apply to every message delivered from then on: `line/open`
/// delivered, `line/secret` withheld.
#[test]
fn a_rule_change_keeps_existing_subscriptions_and_withholds_newly_denied_topics() {
    let state = |extra: &str| {
        format!(
            "[[credentials]]\nname = \"reader\"\nx509 = {{ identity = \"device-1\" }}\nrules = [{{ access = \"read\", pattern = \"line/#\" }}{extra}]\n\n\
             [[credentials]]\nname = \"writer\"\nx509 = {{ identity = \"device-2\" }}\nrules = [{{ access = \"write\", pattern = \"line/#\" }}]\n"
        )
    };
    let f = fleet(&state(""), "");
    let mut reader = f.connected(V5, "device-1", "device-1");
    assert_eq!(subscribe(&mut reader, &["line/#"]), [SubscribeReasonCode::QoS1], "setup");
    f.reload(&state(", { access = \"read\", pattern = \"line/secret\", deny = true }"));
    let mut writer = f.connected(V5, "device-2", "device-2");
    for topic in ["line/secret", "line/open"] {
        assert_eq!(publish(&mut writer, topic, false), Some(PubAckReason::Success), "setup");
    }
    assert_eq!(delivered(&mut reader), ["line/open"], "line/secret is denied since the reload");
}

/// Defect: a wildcard subscription that merely overlaps a deny rule is refused whole. With allow
/// `site/#` and a read deny on `site/keys`, SUBSCRIBE `site/#` is granted (as Mosquitto does),
/// `site/a` is delivered and `site/keys` (live or retained) withheld.
#[test]
fn a_wildcard_overlapping_a_read_deny_is_granted_and_only_the_denied_topic_withheld() {
    let state = r#"
[[credentials]]
name = "monitor"
x509 = { identity = "device-1" }
rules = [{ access = "read", pattern = "site/#" }, { access = "read", pattern = "site/keys", deny = true }]

[[credentials]]
name = "writer"
x509 = { identity = "device-2" }
rules = [{ access = "write", pattern = "site/#" }]
"#;
    let f = fleet(state, "");
    let mut writer = f.connected(V5, "device-2", "device-2");
    assert_eq!(publish(&mut writer, "site/keys", true), Some(PubAckReason::Success), "setup");
    let mut monitor = f.connected(V5, "device-1", "device-1");
    let codes = subscribe(&mut monitor, &["site/#"]);
    assert_eq!(codes, [SubscribeReasonCode::QoS1], "SUBSCRIBE site/# must be granted (only site/keys is denied)");
    for topic in ["site/keys", "site/a"] {
        assert_eq!(publish(&mut writer, topic, false), Some(PubAckReason::Success), "setup");
    }
    assert_eq!(delivered(&mut monitor), ["site/a"], "site/keys (retained and live) withheld, site/a delivered");
}

/// Defect: a client kicked by an administrative action — its credential disabled, or its
/// certificate revoked, then SIGHUP — still has its will published. It must not.
#[test]
fn an_administratively_kicked_client_does_not_publish_its_will() {
    let state = |device_1: &str, revocations: &str| {
        format!(
            "[[credentials]]\nname = \"device-1\"\n{device_1}x509 = {{ identity = \"device-1\" }}\nrules = [{{ access = \"write\", pattern = \"status/%u\" }}]\n\n\
             [[credentials]]\nname = \"monitor\"\nx509 = {{ identity = \"device-2\" }}\nrules = [{{ access = \"read\", pattern = \"status/#\" }}]\n{revocations}"
        )
    };
    let with_will = |client_id: &str| {
        let mut c = clean(client_id);
        c.last_will = Some(v5::LastWill::new("status/device-1", client_id, QoS::AtLeastOnce, false));
        c
    };
    let mut published = Vec::new();
    for action in ["credential disabled", "certificate revoked"] {
        let f = fleet(&state("", ""), "");
        let mut monitor = f.connected(V5, "device-2", "device-2");
        assert_eq!(subscribe(&mut monitor, &["status/#"]), [SubscribeReasonCode::QoS1], "setup");

        // Control: a connection that is simply lost does publish its will.
        let mut lost = f.device(V5, "device-1");
        assert_eq!(connack(&mut lost, with_will("device-1-lost")).code, ConnectReturnCode::Success, "setup");
        drop(lost);
        f.broker.wait_for_log("client disconnected", Duration::from_secs(5)).expect("setup: the lost client is noticed");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(delivered(&mut monitor), ["status/device-1"], "setup: the will of a lost connection is published");

        let mut doomed = f.device(V5, "device-1");
        assert_eq!(connack(&mut doomed, with_will("device-1")).code, ConnectReturnCode::Success, "setup");
        let new_state = match action {
            "credential disabled" => state("enabled = false\n", ""),
            _ => state("", &f.revocation_of("device-1")),
        };
        f.reload(&new_state);
        // The broker closes the socket only once the session is offline and its will handed over.
        match doomed.recv() {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::AdministrativeAction, "setup: {action}");
                assert!(doomed.recv().is_none(), "setup: {action}: the connection is closed");
            }
            None => {}
            other => panic!("setup: {action}: expected DISCONNECT 0x98 or close, got {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
        let wills = delivered(&mut monitor);
        if !wills.is_empty() {
            published.push(format!("{action}: {wills:?}"));
        }
    }
    assert!(published.is_empty(), "the will of an administratively kicked client was published: {published:?}");
}

/// Defect (issue 22, 4): a will with a delay was published when the delay ended even if the
/// client's certificate had been revoked (or its write permission removed) meanwhile. The will is
/// checked again when it fires: a revocation during the delay withholds it.
#[test]
fn a_delayed_will_is_withheld_when_the_certificate_is_revoked_during_the_delay() {
    let state = |revocations: &str| {
        format!(
            "[[credentials]]\nname = \"device-1\"\nx509 = {{ identity = \"device-1\" }}\nrules = [{{ access = \"write\", pattern = \"status/%u\" }}]\n\n\
             [[credentials]]\nname = \"monitor\"\nx509 = {{ identity = \"device-2\" }}\nrules = [{{ access = \"read\", pattern = \"status/#\" }}]\n{revocations}"
        )
    };
    let f = fleet(&state(""), "");
    let mut monitor = f.connected(V5, "device-2", "device-2");
    assert_eq!(subscribe(&mut monitor, &["status/#"]), [SubscribeReasonCode::QoS1], "setup");
    let mut connect = persistent(V5, "device-1");
    let mut will = v5::LastWill::new("status/device-1", "gone", QoS::AtLeastOnce, false);
    will.properties = Some(v5::WillProperties {
        delay_interval: Some(2),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    });
    connect.last_will = Some(will);
    let mut doomed = f.device(V5, "device-1");
    assert_eq!(connack(&mut doomed, connect).code, ConnectReturnCode::Success, "setup");
    drop(doomed);
    f.broker.wait_for_log("client disconnected", Duration::from_secs(5)).expect("setup: the lost client is noticed");
    // Revoked during the will delay.
    f.reload(&state(&f.revocation_of("device-1")));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(delivered(&mut monitor).is_empty(), "the will of a certificate revoked during its delay was published");
    f.broker.wait_for_log("will not published", Duration::from_secs(5)).expect("the withheld will is logged");
}

/// Defect (issue 22, 5): one client could fill the node-wide retained store, after which every
/// other client's new retained topics were refused. Each principal now has its own quota
/// (`limits.max_retained_per_client`): past it, its retained PUBLISH gets PUBACK 0x97 and goes
/// nowhere, while the other devices keep storing theirs.
#[test]
fn one_device_filling_its_retained_quota_does_not_crowd_out_the_others() {
    let state = "[[credentials]]\nname = \"devices\"\nx509 = { identity_regex = \"device-[0-9]+\" }\nrules = [{ access = \"readWrite\", pattern = \"#\" }]\n";
    let f = fleet(state, "[limits]\nmax_retained_per_client = 3\nmax_retained_messages = 5");
    let mut greedy = f.connected(V5, "device-1", "device-1");
    for n in 1..=3 {
        assert_eq!(publish(&mut greedy, &format!("status/greedy/{n}"), true), Some(PubAckReason::Success), "setup: #{n}");
    }
    assert_eq!(publish(&mut greedy, "status/greedy/4", true), Some(PubAckReason::QuotaExceeded), "past its quota");
    assert_eq!(publish(&mut greedy, "status/greedy/1", true), Some(PubAckReason::Success), "replacing its own topic stays allowed");
    assert_eq!(publish(&mut greedy, "status/greedy/live", false), Some(PubAckReason::Success), "non-retained messages are not limited");
    let mut other = f.connected(V5, "device-2", "device-2");
    assert_eq!(publish(&mut other, "status/other/1", true), Some(PubAckReason::Success), "another device still stores its own");
    let mut late = f.connected(V5, "device-10", "device-10");
    assert_eq!(subscribe(&mut late, &["status/#"]), [SubscribeReasonCode::QoS1]);
    let mut retained = delivered(&mut late);
    retained.sort();
    assert_eq!(retained, ["status/greedy/1", "status/greedy/2", "status/greedy/3", "status/other/1"], "the refused one went nowhere");
    assert_eq!(f.broker.metric("rampart_retained_refused_total{limit=\"client_messages\"}"), 1);
}

/// Defect: when the broker ends a connection with a reason (here DISCONNECT 0x98 once anonymous
/// clients are no longer allowed), it closes the socket at once. While the client is still
/// writing, that close is a reset, and what the client has not received yet — the DISCONNECT
/// included — is thrown away. The client here keeps writing from one thread and reads a flood of
/// messages more slowly than they come (so the DISCONNECT waits behind them) until the broker
/// logs the disconnection (or 1.5 s after the SIGHUP), then at full speed: it must still read
/// DISCONNECT 0x98. (The reset shows as EOF here: the writing thread consumes the socket error.)
#[test]
fn a_kicked_v5_client_that_keeps_writing_still_reads_disconnect_0x98() {
    let allowed = "[defaults]\nanonymous = true\nanonymous_rules = [{ access = \"readWrite\", pattern = \"load/#\" }]\n";
    let mut outcomes = Vec::new();
    for attempt in 0..3 {
        let f = fleet(allowed, "");
        let client_id = format!("slow-reader-{attempt}");
        let (mut stream, mut input) = raw_v5(&f, &client_id);
        let mut s = v5::Subscribe::new("load/flood", QoS::AtMostOnce);
        s.pkid = 1;
        stream.write_all(&encode(&Packet::Subscribe(s))).unwrap();
        match read_packet(&mut stream, &mut input) {
            Ok(Packet::SubAck(a)) if a.return_codes == [SubscribeReasonCode::QoS0] => {}
            other => panic!("setup: expected SUBACK, got {other:?}"),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let noise = keep_writing(stream.try_clone().unwrap(), "load/noise", stop.clone());
        let (flooder, _) = raw_v5(&f, "flooder");
        let flood = keep_writing(flooder, "load/flood", stop.clone());

        let started = Instant::now();
        let (mut reloaded, mut fast) = (None, None);
        let outcome = loop {
            while let Ok(line) = f.broker.logs.try_recv() {
                if line.contains("client disconnected") && line.contains(&client_id) {
                    fast = fast.or(Some(Instant::now()));
                }
            }
            if reloaded.is_none() && started.elapsed() > Duration::from_secs(1) {
                std::fs::write(&f.state_file, "[defaults]\nanonymous = false\n").unwrap();
                assert!(Command::new("kill").args(["-HUP", &f.broker.pid().to_string()]).status().unwrap().success());
                reloaded = Some(Instant::now());
            }
            if started.elapsed() > Duration::from_secs(30) {
                break "no DISCONNECT within 30 s".to_string();
            }
            match read_packet(&mut stream, &mut input) {
                Ok(Packet::Disconnect(d)) => break format!("DISCONNECT {:?}", d.reason_code),
                Ok(_) if fast.is_none() && reloaded.is_none_or(|r| r.elapsed() < Duration::from_millis(1500)) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Ok(_) => {}
                Err(e) => break format!("{e} (kick logged {:?} after SIGHUP)", fast.zip(reloaded).map(|(f, r)| f - r)),
            }
        };
        stop.store(true, Ordering::Relaxed);
        noise.join().unwrap();
        flood.join().unwrap();
        outcomes.push(outcome);
    }
    assert!(
        outcomes.iter().all(|o| o == "DISCONNECT AdministrativeAction"),
        "a kicked client that keeps writing must read DISCONNECT 0x98 every time; got {outcomes:?}"
    );
}

/// An anonymous MQTT 5 connection on a plain socket (5 s timeouts), CONNACK checked.
fn raw_v5(f: &Fleet, client_id: &str) -> (TcpStream, bytes::BytesMut) {
    let mut stream = TcpStream::connect(f.broker.tcp.unwrap()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut input = bytes::BytesMut::new();
    stream.write_all(&encode(&Packet::Connect(clean(client_id)))).unwrap();
    match read_packet(&mut stream, &mut input) {
        Ok(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {}
        other => panic!("setup: expected CONNACK success for {client_id}, got {other:?}"),
    }
    (stream, input)
}

/// Writes QoS 0 PUBLISHes of 1 kB to `topic` until `stop`, the connection fails, or 30 s pass.
fn keep_writing(mut out: TcpStream, topic: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let batch: Vec<u8> = (0..32).flat_map(|_| encode(&Packet::Publish(v5::Publish::new(topic, QoS::AtMostOnce, [7u8; 1000])))).collect();
    std::thread::spawn(move || {
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
            match out.write_all(&batch) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    })
}

fn encode(packet: &Packet) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    rampart_node::mqtt::codec::encode(V5, packet, &mut out, None).expect("encode");
    out.to_vec()
}

/// The next MQTT 5 packet, or how the connection ended (EOF, reset, timeout) as text.
fn read_packet(stream: &mut TcpStream, input: &mut bytes::BytesMut) -> Result<Packet, String> {
    loop {
        match rampart_node::mqtt::codec::decode(V5, input, usize::MAX) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(e) => return Err(format!("undecodable input: {e}")),
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return Err("connection ended (EOF) without DISCONNECT".into()),
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}
