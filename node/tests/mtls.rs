//! Mutual TLS end to end with real certificates (made by `rampart pki`, by `openssl`, and by
//! rcgen for the odd cases) and a real client (`mosquitto_pub`): one test per failure mode.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::Broker;
use rampart_node::pki::{Kind, Store};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use time::OffsetDateTime;

struct Fleet {
    _dir: tempfile::TempDir,
    store: Store,
    broker: Broker,
}

/// A PKI with devices plc-1 and plc-2 (plc-2 revoked in the CRL) and a broker requiring client
/// certificates from it.
fn fleet(extra_listener_keys: &str) -> Fleet {
    fleet_with("required", extra_listener_keys)
}

fn fleet_with(client_certificate: &str, extra_listener_keys: &str) -> Fleet {
    rampart_node::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("pki"));
    store.init_ca("Test Fleet CA", 30, rampart_node::pki::CaKey::EcdsaP256).unwrap();
    store.issue(Kind::Server, "localhost", &["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    for device in ["plc-1", "plc-2"] {
        store.issue(Kind::Device, device, &[], 30).unwrap();
    }
    store.revoke(&store.paths(Kind::Device, "plc-2").0, "keyCompromise").unwrap();
    store.write_crl(7).unwrap();
    let (server_cert, server_key) = store.paths(Kind::Server, "localhost");
    let listener = format!(
        "[listeners.tls]\nbind = \"127.0.0.1:0\"\ncert_file = {server_cert:?}\nkey_file = {server_key:?}\nclient_certificate = \"{client_certificate}\"\nca_file = {:?}\ncrl_files = [{:?}]\n{extra_listener_keys}\n",
        store.ca_cert(),
        store.crl_path()
    );
    let broker = Broker::start_with(&listener, 1);
    Fleet { _dir: dir, store, broker }
}

impl Fleet {
    /// Publishes one QoS 1 message with `mosquitto_pub` presenting `identity` (cert, key).
    fn publish(&self, identity: Option<(&Path, &Path)>, client_id: &str) -> Output {
        let mut command = Command::new("mosquitto_pub");
        command.args(["-h", "localhost", "-p", &self.broker.tls.unwrap().port().to_string(), "--cafile"]).arg(self.store.ca_cert()).args([
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            client_id,
            "-t",
            "devices/x",
            "-m",
            "hello",
        ]);
        if let Some((cert, key)) = identity {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        common::run_with_timeout(command, Duration::from_secs(20))
    }

    fn device(&self, name: &str) -> (PathBuf, PathBuf) {
        self.store.paths(Kind::Device, name)
    }

    /// A certificate signed by this CA with arbitrary CN and validity, made with rcgen.
    fn odd_certificate(&self, cn: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> (PathBuf, PathBuf) {
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.store.dir().join("ca.key")).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.store.ca_cert()).unwrap(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).unwrap();
        let base = self.store.dir().join(format!("odd-{}", not_after.unix_timestamp()));
        let (cert_path, key_path) = (base.with_extension("pem"), base.with_extension("key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn succeeded(out: &Output) -> bool {
    out.status.success()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_device_certificate_from_rampart_pki_connects_and_its_identity_is_used() {
    let f = fleet("");
    let (cert, key) = f.device("plc-1");
    let out = f.publish(Some((&cert, &key)), "plc-1-main");
    assert!(succeeded(&out), "{}", stderr(&out));
    assert!(f.broker.wait_for_log("identity=plc-1", Duration::from_secs(5)).is_some());
}

#[test]
fn a_device_certificate_made_with_openssl_connects() {
    let f = fleet("");
    let dir = f.store.dir();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ossl.key"]);
    run(&["req", "-new", "-key", "ossl.key", "-subj", "/CN=sensor-9", "-out", "ossl.csr"]);
    std::fs::write(dir.join("ossl.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "ossl.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ossl.ext",
        "-out",
        "ossl.pem",
    ]);
    let out = f.publish(Some((&dir.join("ossl.pem"), &dir.join("ossl.key"))), "sensor-9");
    assert!(succeeded(&out), "{}", stderr(&out));
}

#[test]
fn no_certificate_wrong_ca_expired_and_not_yet_valid_fail_the_handshake() {
    let f = fleet("");
    assert!(!succeeded(&f.publish(None, "anonymous")), "a client without a certificate got in");

    let other = Store::new(f.store.dir().join("other"));
    other.init_ca("Other CA", 30, rampart_node::pki::CaKey::EcdsaP256).unwrap();
    let (cert, key) = other.issue(Kind::Device, "plc-1", &[], 30).map(|i| (i.cert, i.key)).unwrap();
    assert!(!succeeded(&f.publish(Some((&cert, &key)), "plc-1")), "a certificate of another CA got in");

    let now = OffsetDateTime::now_utc();
    let (cert, key) = f.odd_certificate("plc-1", now - time::Duration::days(10), now - time::Duration::days(1));
    assert!(!succeeded(&f.publish(Some((&cert, &key)), "plc-1")), "an expired certificate got in");
    let (cert, key) = f.odd_certificate("plc-1", now + time::Duration::days(1), now + time::Duration::days(10));
    assert!(!succeeded(&f.publish(Some((&cert, &key)), "plc-1")), "a not-yet-valid certificate got in");
    assert!(f.broker.metric("rampart_connections_refused_total") >= 4);
}

#[test]
fn a_certificate_revoked_in_the_crl_is_refused_and_others_are_not() {
    let f = fleet("");
    let (revoked_cert, revoked_key) = f.device("plc-2");
    assert!(!succeeded(&f.publish(Some((&revoked_cert, &revoked_key)), "plc-2")));
    assert!(f.broker.wait_for_log("handshake failed", Duration::from_secs(5)).is_some_and(|l| l.contains("Revoked")));
    let (cert, key) = f.device("plc-1");
    assert!(succeeded(&f.publish(Some((&cert, &key)), "plc-1")));
}

#[test]
fn an_identity_with_mqtt_wildcards_is_not_authorized() {
    let f = fleet("");
    let now = OffsetDateTime::now_utc();
    for cn in ["plc/+", "plc-#"] {
        let (cert, key) = f.odd_certificate(cn, now - time::Duration::hours(1), now + time::Duration::days(1));
        let out = f.publish(Some((&cert, &key)), "plc");
        assert!(!succeeded(&out));
        assert!(stderr(&out).to_lowercase().contains("not authori"), "{}", stderr(&out));
    }
}

#[test]
fn a_device_cannot_use_another_devices_client_id() {
    let f = fleet("");
    let (cert, key) = f.device("plc-1");
    let out = f.publish(Some((&cert, &key)), "plc-2");
    assert!(!succeeded(&out));
    assert!(stderr(&out).to_lowercase().contains("not authori"), "{}", stderr(&out));
    assert!(succeeded(&f.publish(Some((&cert, &key)), "plc-1-second-connection")));
}

#[test]
fn identity_from_a_san_uri_with_a_pattern() {
    let f = fleet("identity_source = \"san_uri\"\nidentity_pattern = \"^spiffe://fleet\\\\.test/device/(?P<id>[a-z0-9-]+)$\"");
    let (cert, key) = f.device("plc-1");
    let out = f.publish(Some((&cert, &key)), "plc-1");
    assert!(!succeeded(&out), "a certificate without the SAN URI must not get an identity");
    assert!(stderr(&out).to_lowercase().contains("not authori"), "{}", stderr(&out));
}

#[test]
fn reloading_a_new_crl_disconnects_the_revoked_live_client_and_refuses_its_handshakes() {
    let f = fleet("");
    let (cert, key) = f.device("plc-1");
    let mut live =
        common::Raw::tls(f.broker.tls.unwrap(), rampart_node::mqtt::codec::ProtocolVersion::V5, &f.store.ca_cert(), (&cert, &key));
    live.handshake("plc-1");
    // While it is connected, its certificate (30 days, from `rampart pki`) is in the expiry
    // histogram's 30-day bucket.
    assert_eq!(f.broker.metric("rampart_client_certificate_expiry_seconds_count"), 1);
    assert_eq!(f.broker.metric("rampart_client_certificate_expiry_seconds_bucket{le=\"1209600\"}"), 0);
    assert_eq!(f.broker.metric("rampart_client_certificate_expiry_seconds_bucket{le=\"2592000\"}"), 1);
    f.store.revoke(&cert, "keyCompromise").unwrap();
    f.store.write_crl(7).unwrap();
    let status = Command::new("kill").args(["-HUP", &f.broker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    match live.recv() {
        Some(rampart_node::mqtt::codec::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, mqttbytes::v5::DisconnectReasonCode::AdministrativeAction)
        }
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    assert!(!succeeded(&f.publish(Some((&cert, &key)), "plc-1")), "the revoked certificate got in after the reload");
    let line = f.broker.wait_for_log("handshake failed", Duration::from_secs(5)).expect("the handshake failure is logged");
    assert!(line.contains("Revoked"), "{line}");
}

/// paho-mqtt with `tls_set(certfile=…, keyfile=…)`: prints the CONNACK reason, or `refused`
/// when the TLS handshake fails (under TLS 1.3 the client learns it on its first read).
const PAHO_MTLS: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
port, ca, cert, key, client_id = sys.argv[1:6]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca, certfile=cert or None, keyfile=key or None)
done, result = threading.Event(), []
c.on_connect = lambda cl, u, f, rc, p: (result.append(str(rc)), done.set())
c.on_disconnect = lambda cl, u, f, rc, p: (result.append("refused"), done.set())
try:
    c.connect("localhost", int(port), 10)
except Exception:
    print("refused")
    sys.exit(0)
c.loop_start()
done.wait(5)
c.loop_stop()
print(result[0] if result else "no answer")
"#;

#[test]
fn paho_with_a_client_certificate() {
    let f = fleet("");
    let (cert, key) = f.device("plc-1");
    let (other_cert, other_key) = f.device("plc-2");
    let paho = |cert: &Path, key: &Path, client_id: &str| {
        let mut command = Command::new("python3");
        command.args(["-c", PAHO_MTLS, &f.broker.tls.unwrap().port().to_string()]).arg(f.store.ca_cert()).arg(cert).arg(key).arg(client_id);
        let out = common::run_with_timeout(command, Duration::from_secs(30));
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(paho(&cert, &key, "plc-1"), "Success");
    assert_eq!(paho(&cert, &key, "plc-9"), "Not authorized", "client-id spoofing");
    assert_eq!(paho(&other_cert, &other_key, "plc-2"), "refused", "revoked by the CRL");
    assert_eq!(paho(Path::new(""), Path::new(""), "anonymous"), "refused", "no certificate");
}

#[test]
fn rumqttc_with_client_authentication() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket, QoS as RQoS, TlsConfiguration, Transport};
    let f = fleet("");
    let connect = |device: &str| {
        let (cert, key) = f.device(device);
        let mut options = MqttOptions::new(device, "localhost", f.broker.tls.unwrap().port());
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: std::fs::read(f.store.ca_cert()).unwrap(),
            alpn: None,
            client_auth: Some((std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())),
        }));
        AsyncClient::new(options, 10)
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (client, mut events) = connect("plc-1");
        client.subscribe("devices/plc-1/echo", RQoS::AtLeastOnce).await.unwrap();
        client.publish("devices/plc-1/echo", RQoS::AtLeastOnce, false, "over mtls").await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(RPacket::Publish(p)) = events.poll().await.expect("plc-1 stays connected") {
                    return p.payload;
                }
            }
        })
        .await
        .expect("the message came back");
        assert_eq!(&echoed[..], b"over mtls");

        let (_revoked, mut revoked_events) = connect("plc-2");
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match revoked_events.poll().await {
                    Err(e) => return Err(e),
                    Ok(Event::Incoming(RPacket::ConnAck(ack))) => return Ok(ack),
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("an answer for the revoked certificate");
        assert!(outcome.is_err(), "the certificate revoked by the CRL connected: {outcome:?}");
    });
}

#[test]
fn an_optional_client_certificate_lets_clients_without_one_fall_through() {
    let f = fleet_with("optional", "");
    assert!(succeeded(&f.publish(None, "no-certificate")), "anonymous clients are allowed without a state file");
    let (cert, key) = f.device("plc-1");
    assert!(succeeded(&f.publish(Some((&cert, &key)), "plc-1")));
    assert!(f.broker.wait_for_log("identity=plc-1", Duration::from_secs(5)).is_some(), "a presented certificate still gives the identity");
    let (revoked, revoked_key) = f.device("plc-2");
    assert!(!succeeded(&f.publish(Some((&revoked, &revoked_key)), "plc-2")), "a presented certificate is still verified");
}
