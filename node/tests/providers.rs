//! The authentication provider chain against the real binary, on raw connections with exact
//! reason codes: JWT clients (claims as permissions, forged/expired/unbound tokens, disconnect
//! at expiry), password credentials bound to a client id, and the order of `x509` and `basic`
//! for a client that presents both a certificate and a password (switched by SIGHUP), and
//! mosquitto_pub/sub logging in with tokens.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Broker, Raw};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use mqttbytes::v5::{self, ConnectReturnCode, DisconnectReasonCode, PubAckReason};
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::{V311, V5};
use rampart_node::pki::{Kind, Store};

const SECRET: &str = "integration-secret-integration-secret";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn token(claims: serde_json::Value, secret: &str) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn state(order: &str) -> String {
    let hash = rampart_node::auth::password::hash("s3cret").unwrap();
    format!(
        r#"
[providers]
order = {order}
[providers.jwt]
hmac_secret = "{SECRET}"
issuer = "idp"
leeway_secs = 0
client_id_claim = "cid"
disconnect_at_expiry = true
rules = [{{ access = "write", pattern = "default/%u" }}]

[[credentials]]
name = "plc-1"
x509 = {{ identity = "plc-1" }}
rules = [{{ access = "write", pattern = "cert/#" }}]

[[credentials]]
name = "plc-1-password"
password = {{ username = "plc-1", hash = "{hash}" }}
rules = [{{ access = "write", pattern = "pw/#" }}]

[[credentials]]
name = "kiosk"
password = {{ client_id = "kiosk-1", hash = "{hash}" }}
rules = [{{ access = "write", pattern = "kiosk/%c" }}, {{ access = "write", pattern = "users/%u/#" }}]
"#
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
    state_file: PathBuf,
    broker: Broker,
}

fn setup(order: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("pki"));
    store.init_ca("Providers Test CA", 30, rampart_node::pki::CaKey::EcdsaP256).unwrap();
    store.issue(Kind::Server, "localhost", &["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    store.issue(Kind::Device, "plc-1", &[], 30).unwrap();
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, state(order)).unwrap();
    let (cert, key) = store.paths(Kind::Server, "localhost");
    let config = format!(
        "[auth]\nstate_file = {state_file:?}\n[listeners.tls]\nbind = \"127.0.0.1:0\"\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_certificate = \"required\"\nca_file = {:?}\n",
        store.ca_cert()
    );
    let broker = Broker::start_with(&config, 1);
    Setup { _dir: dir, store, state_file, broker }
}

fn login(client_id: &str, username: &str, password: &str) -> v5::Connect {
    let mut c = v5::Connect::new(client_id);
    c.set_login(username, password);
    c
}

/// Publishes at QoS 1 and returns the PUBACK reason.
fn publish(client: &mut Raw, topic: &str) -> PubAckReason {
    let mut p = v5::Publish::new(topic, QoS::AtLeastOnce, "x");
    p.pkid = 1;
    client.send_packet(&Packet::Publish(p));
    match client.recv() {
        Some(Packet::PubAck(ack)) => ack.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn reload(broker: &Broker, state_file: &Path, text: &str) {
    std::fs::write(state_file, text).unwrap();
    assert!(Command::new("kill").args(["-HUP", &broker.pid().to_string()]).status().unwrap().success());
    broker.wait_for_log("reloaded", Duration::from_secs(5)).expect("state reloaded");
}

#[test]
fn jwt_clients_get_the_permissions_of_their_claims_and_bad_tokens_a_clear_code() {
    let s = setup(r#"["x509", "basic", "jwt"]"#);
    let tcp = s.broker.tcp.unwrap();
    let claims = |cid: &str, exp: i64| serde_json::json!({"sub": "app-1", "iss": "idp", "cid": cid, "exp": exp, "mqtt_pub": ["up/%u/#"]});
    let good = token(claims("app-1-c", now() + 600), SECRET);
    let mut client = Raw::socket(tcp, V5);
    assert_eq!(client.connack_with(login("app-1-c", "", &good)), ConnectReturnCode::Success);
    assert_eq!(publish(&mut client, "up/app-1/t"), PubAckReason::Success, "allowed by the token's claim");
    assert_eq!(publish(&mut client, "up/app-2/t"), PubAckReason::NotAuthorized);
    assert_eq!(publish(&mut client, "default/app-1"), PubAckReason::NotAuthorized, "claims replace the provider's rules");

    // Without rule claims, the provider's rules apply, with %u the subject.
    let plain = token(serde_json::json!({"sub": "app-2", "iss": "idp", "cid": "app-2-c", "exp": now() + 600}), SECRET);
    let mut client = Raw::socket(tcp, V5);
    assert_eq!(client.connack_with(login("app-2-c", "", &plain)), ConnectReturnCode::Success);
    assert_eq!(publish(&mut client, "default/app-2"), PubAckReason::Success);

    // MQTT 5 allows a password without a user name: only jwt applies.
    let code = |connect: v5::Connect| Raw::socket(tcp, V5).connack_with(connect);
    let forged = token(claims("app-1-c", now() + 600), "another-secret-another-secret-xxxxxx");
    assert_eq!(code(login("app-1-c", "", &forged)), ConnectReturnCode::BadUserNamePassword, "forged");
    let expired = token(claims("app-1-c", now() - 5), SECRET);
    assert_eq!(code(login("app-1-c", "", &expired)), ConnectReturnCode::BadUserNamePassword, "expired");
    assert_eq!(code(login("app-1-c", "", "garbage")), ConnectReturnCode::BadUserNamePassword, "malformed");
    assert_eq!(code(login("someone-else", "", &good)), ConnectReturnCode::NotAuthorized, "bound to another client id");
    // MQTT 3.1.1 needs a user name with a password: basic applies too (no such user), then jwt.
    let mut v311 = Raw::socket(tcp, V311);
    assert_eq!(v311.connack_with(login("app-1-c", "app", &good)), ConnectReturnCode::Success);
    assert_eq!(Raw::socket(tcp, V311).connack_with(login("app-1-c", "app", &forged)), ConnectReturnCode::BadUserNamePassword);
    let line = s.broker.wait_for_log("jwt: token: expired", Duration::from_secs(5)).expect("the refusal is logged with its reason");
    assert!(line.contains("connection refused"), "{line}");
}

#[test]
fn a_session_ends_with_0xa0_when_its_token_expires() {
    let s = setup(r#"["jwt"]"#);
    let short = token(serde_json::json!({"sub": "app-3", "iss": "idp", "cid": "app-3", "exp": now() + 2}), SECRET);
    let mut client = Raw::socket(s.broker.tcp.unwrap(), V5);
    let started = Instant::now();
    assert_eq!(client.connack_with(login("app-3", "", &short)), ConnectReturnCode::Success);
    client.expect_close(Some(DisconnectReasonCode::MaximumConnectTime));
    assert!(started.elapsed() < Duration::from_secs(10), "disconnected at expiry, not later");
}

#[test]
fn a_password_credential_bound_to_a_client_id_alone() {
    let s = setup(r#"["basic"]"#);
    let tcp = s.broker.tcp.unwrap();
    let mut kiosk = Raw::socket(tcp, V5);
    assert_eq!(kiosk.connack_with(login("kiosk-1", "", "s3cret")), ConnectReturnCode::Success);
    assert_eq!(publish(&mut kiosk, "kiosk/kiosk-1"), PubAckReason::Success);
    assert_eq!(Raw::socket(tcp, V5).connack_with(login("kiosk-1", "", "wrong")), ConnectReturnCode::BadUserNamePassword);
    // No user name and no credential for the client id: basic does not apply, the client is
    // anonymous, and anonymous clients are not allowed.
    assert_eq!(Raw::socket(tcp, V5).connack_with(login("kiosk-2", "", "s3cret")), ConnectReturnCode::NotAuthorized);
    // A user name it sends (MQTT 3.1.1 needs one beside a password) is not verified by this
    // credential: it never becomes %u, so the kiosk cannot speak as another user.
    let mut hostile = Raw::socket(tcp, V5);
    assert_eq!(hostile.connack_with(login("kiosk-1", "device-9", "s3cret")), ConnectReturnCode::Success);
    assert_eq!(publish(&mut hostile, "users/device-9/cmd"), PubAckReason::NotAuthorized, "%u is not the unverified user name");
    assert_eq!(publish(&mut hostile, "kiosk/kiosk-1"), PubAckReason::Success);
}

#[test]
fn the_order_of_x509_and_basic_decides_who_a_client_with_both_is() {
    let s = setup(r#"["x509", "basic"]"#);
    let (cert, key) = s.store.paths(Kind::Device, "plc-1");
    let both = || {
        let mut c = Raw::tls(s.broker.tls.unwrap(), V5, &s.store.ca_cert(), (&cert, &key));
        assert_eq!(c.connack_with(login("plc-1", "plc-1", "s3cret")), ConnectReturnCode::Success);
        c
    };
    let mut client = both();
    assert_eq!(publish(&mut client, "cert/x"), PubAckReason::Success, "x509 first: the certificate credential");
    assert_eq!(publish(&mut client, "pw/x"), PubAckReason::NotAuthorized);
    drop(client);

    reload(&s.broker, &s.state_file, &state(r#"["basic", "x509"]"#));
    let mut client = both();
    assert_eq!(publish(&mut client, "pw/x"), PubAckReason::Success, "basic first: the password credential");
    assert_eq!(publish(&mut client, "cert/x"), PubAckReason::NotAuthorized);

    // Disabling basic while that client is connected ends its session.
    reload(&s.broker, &s.state_file, &state(r#"["x509"]"#));
    match client.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, DisconnectReasonCode::AdministrativeAction),
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
}

/// Real clients: `mosquitto_sub` and `mosquitto_pub` (MQTT 5) log in with tokens as passwords.
#[test]
fn mosquitto_clients_log_in_with_tokens() {
    let s = setup(r#"["x509", "basic", "jwt"]"#);
    let port = s.broker.tcp.unwrap().port().to_string();
    let token_for = |cid: &str, exp: i64, secret: &str| {
        let claims =
            serde_json::json!({"sub": cid, "iss": "idp", "cid": cid, "exp": exp, "mqtt_pub": ["fleet/#"], "mqtt_sub": ["fleet/#"]});
        token(claims, secret)
    };
    let client = |tool: &str, cid: &str, token: &str, extra: &[&str]| {
        let mut command = Command::new(tool);
        command.args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-i", cid, "-P", token, "-t", "fleet/news"]).args(extra);
        command
    };
    let sub_token = token_for("sub-1", now() + 600, SECRET);
    let subscriber =
        client("mosquitto_sub", "sub-1", &sub_token, &["-C", "1", "-W", "10"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    s.broker.wait_for_log("client connected", Duration::from_secs(5)).expect("the subscriber is in");
    std::thread::sleep(Duration::from_millis(300));
    let pub_token = token_for("pub-1", now() + 600, SECRET);
    let published =
        common::run_with_timeout(client("mosquitto_pub", "pub-1", &pub_token, &["-q", "1", "-m", "hello"]), Duration::from_secs(10));
    assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    let received = subscriber.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&received.stdout).trim(), "hello");

    for (why, bad) in
        [("expired", token_for("pub-2", now() - 5, SECRET)), ("forged", token_for("pub-2", now() + 600, "x".repeat(40).as_str()))]
    {
        let refused = common::run_with_timeout(client("mosquitto_pub", "pub-2", &bad, &["-m", "x"]), Duration::from_secs(10));
        assert!(!refused.status.success(), "{why}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.to_lowercase().contains("bad user name or password"), "{why}: {stderr}");
    }
}

/// Defect (issue 22, 3): a stored argon2 hash's costs were used as they were, so one credential
/// with m = 4 GiB made every CONNECT naming its user name allocate 4 GiB, and unusual costs told
/// known user names from unknown ones by their timing. Such a state is now refused when it is
/// written, naming the file and the key; the broker never serves with it.
#[test]
fn a_state_with_a_costly_argon2_hash_is_refused_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("auth.toml");
    let costly = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXphYmNkZWY";
    std::fs::write(&state, format!("[[credentials]]\nname = \"greedy\"\npassword = {{ username = \"greedy\", hash = \"{costly}\" }}\n"))
        .unwrap();
    let config = dir.path().join("rampart.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        &config,
        format!("[node]\ndata_dir = {:?}\n[http]\nenabled = false\n[listeners.tcp]\nbind = \"127.0.0.1:{port}\"\n[auth]\nstate_file = {state:?}\n", dir.path().join("data")),
    )
    .unwrap();
    let mut serve = common::rampart();
    serve.args(["serve", "--config"]).arg(&config);
    let out = common::run_with_timeout(serve, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the broker must not serve with it: {stderr}");
    assert!(
        stderr.contains("auth.toml") && stderr.contains("password.hash") && stderr.contains("differ from the broker's m=19456,t=2,p=1"),
        "{stderr}"
    );
}
