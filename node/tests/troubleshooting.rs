//! docs/troubleshooting.md against the broker: each failure the tables list is produced with a
//! real client (`mosquitto_pub`), and the broker log words quoted in that row must be in the
//! broker's log line, and what the row says mosquitto prints must be what it prints. The
//! tables cannot drift from the software unnoticed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Broker;
use rampart_node::pki::{Kind, Store};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use time::OffsetDateTime;

const DOC: &str = include_str!("../../docs/troubleshooting.md");

/// The table row of docs/troubleshooting.md that contains `key`, split into cells.
fn row(key: &str) -> Vec<String> {
    let rows: Vec<&str> = DOC.lines().filter(|l| l.starts_with('|') && l.contains(key)).collect();
    assert_eq!(rows.len(), 1, "exactly one row of docs/troubleshooting.md should contain {key:?}: {rows:?}");
    rows[0].trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect()
}

/// The `quoted` spans of a cell.
fn quoted(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// Every `…`-separated piece of `span` is in `text`, in order.
fn contains_in_order(text: &str, span: &str) -> bool {
    let mut rest = text;
    for piece in span.split('…').map(str::trim).filter(|p| !p.is_empty()) {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

struct Fleet {
    _dir: tempfile::TempDir,
    store: Store,
    broker: Broker,
}

fn fleet(listener_keys: &str) -> Fleet {
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
    let hash = rampart_node::auth::password::hash("s3cret").unwrap();
    let state = dir.path().join("auth.toml");
    std::fs::write(
        &state,
        format!("[[credentials]]\nname = \"meter\"\npassword = {{ username = \"meter\", client_id = \"meter-1\", hash = {hash:?} }}\n"),
    )
    .unwrap();
    let (server_cert, server_key) = store.paths(Kind::Server, "localhost");
    let config = format!(
        "[auth]\nstate_file = {state:?}\n[listeners.tls]\nbind = \"127.0.0.1:0\"\ncert_file = {server_cert:?}\nkey_file = {server_key:?}\nclient_certificate = \"required\"\nca_file = {:?}\ncrl_files = [{:?}]\n{listener_keys}\n",
        store.ca_cert(),
        store.crl_path()
    );
    let broker = Broker::start_with(&config, 1);
    Fleet { _dir: dir, store, broker }
}

impl Fleet {
    /// `mosquitto_pub` over TLS (with `identity`) or, for a user name, over TCP; its output.
    fn publish(&self, identity: Option<(&Path, &Path)>, login: Option<(&str, &str)>, client_id: &str) -> String {
        let mut command = Command::new("mosquitto_pub");
        match login {
            Some((user, password)) => {
                command.args(["-h", "127.0.0.1", "-p", &self.broker.tcp.unwrap().port().to_string(), "-u", user, "-P", password]);
            }
            None => {
                command.args(["-h", "localhost", "-p", &self.broker.tls.unwrap().port().to_string(), "--cafile"]).arg(self.store.ca_cert());
            }
        }
        command.args(["-q", "1", "-i", client_id, "-t", "devices/x", "-m", "hello"]);
        if let Some((cert, key)) = identity {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = common::run_with_timeout(command, Duration::from_secs(20));
        assert!(!out.status.success(), "mosquitto_pub as {client_id} was not refused");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// A certificate of this CA with the given validity and extended key usage.
    fn odd_certificate(&self, name: &str, days: (i64, i64), usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.store.dir().join("ca.key")).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.store.ca_cert()).unwrap(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "plc-1");
        params.extended_key_usages = vec![usage];
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let base = self.store.dir().join(name);
        let (cert_path, key_path) = (base.with_extension("pem"), base.with_extension("key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Checks the row with `key`: the broker log spans (column `log_column`) are in the log line
    /// that starts with `log_start`, and the other columns' spans marked as mosquitto output
    /// are in `client_output`.
    fn check(&self, key: &str, log_column: usize, log_start: &str, client_output: &str) {
        let cells = row(key);
        let line = self.broker.wait_for_log(log_start, Duration::from_secs(5)).unwrap_or_else(|| panic!("{key}: no {log_start:?} line"));
        // The reason field is a quoted string; the doc quotes its text.
        let line = line.replace("\\\"", "\"");
        let spans = quoted(&cells[log_column]);
        assert!(!spans.is_empty(), "{key}: the row quotes no log words");
        for span in spans {
            assert!(contains_in_order(&line, &span), "{key}: the doc quotes `{span}`, the log says:\n{line}");
        }
        let client_cells = cells.iter().enumerate().filter(|(column, _)| *column != log_column).map(|(_, cell)| cell);
        for span in client_cells.flat_map(|cell| cell.split("mosquitto: ").skip(1).filter_map(|s| quoted(s).into_iter().next())) {
            assert!(client_output.contains(&span), "{key}: the doc says mosquitto prints `{span}`, it printed:\n{client_output}");
        }
    }
}

#[test]
fn the_tls_handshake_table_matches_the_log() {
    let f = fleet("");
    let out = f.publish(None, None, "anonymous");
    f.check("peer sent no certificates", 1, "handshake failed", &out);

    let other = Store::new(f.store.dir().join("other"));
    other.init_ca("Other CA", 30, rampart_node::pki::CaKey::EcdsaP256).unwrap();
    let foreign = other.issue(Kind::Device, "plc-1", &[], 30).unwrap();
    let out = f.publish(Some((&foreign.cert, &foreign.key)), None, "plc-1");
    f.check("UnknownIssuer", 1, "handshake failed", &out);

    let (cert, key) = f.odd_certificate("expired", (-10, -1), ExtendedKeyUsagePurpose::ClientAuth);
    let out = f.publish(Some((&cert, &key)), None, "plc-1");
    f.check("is not valid after", 1, "handshake failed", &out);

    let (cert, key) = f.odd_certificate("early", (1, 10), ExtendedKeyUsagePurpose::ClientAuth);
    let out = f.publish(Some((&cert, &key)), None, "plc-1");
    f.check("is not valid before", 1, "handshake failed", &out);

    let (cert, key) = f.store.paths(Kind::Device, "plc-2");
    let out = f.publish(Some((&cert, &key)), None, "plc-2");
    f.check("listed in one of the `crl_files`", 1, "handshake failed", &out);

    let (cert, key) = f.odd_certificate("server-only", (-1, 10), ExtendedKeyUsagePurpose::ServerAuth);
    let out = f.publish(Some((&cert, &key)), None, "plc-1");
    f.check("extended key usage", 1, "handshake failed", &out);

    // The other direction: the client does not trust the broker (its --cafile is another CA).
    let (cert, key) = f.store.paths(Kind::Device, "plc-1");
    let mut command = Command::new("mosquitto_pub");
    command.args(["-h", "localhost", "-p", &f.broker.tls.unwrap().port().to_string(), "--cafile"]).arg(other.ca_cert());
    command.arg("--cert").arg(&cert).arg("--key").arg(&key).args(["-i", "plc-1", "-t", "devices/plc-1/x", "-m", "hello"]);
    let out = common::run_with_timeout(command, Duration::from_secs(20));
    assert!(!out.status.success());
    f.check("the client rejects the server", 1, "handshake failed", &String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_connack_table_matches_the_log() {
    let f = fleet("");
    let (cert, key) = f.store.paths(Kind::Device, "plc-1");
    let out = f.publish(Some((&cert, &key)), None, "plc-2");
    f.check("is not allowed for identity", 2, "connection refused", &out);
    let out = f.publish(None, Some(("meter", "s3cret")), "meter-2");
    f.check("is bound to another client id", 2, "connection refused", &out);
    let out = f.publish(None, Some(("meter", "wrong")), "meter-1");
    f.check("basic: unknown user name", 2, "connection refused", &out);

    let f = fleet("identity_source = \"san_uri\"");
    let (cert, key) = f.store.paths(Kind::Device, "plc-1");
    let out = f.publish(Some((&cert, &key)), None, "plc-1");
    f.check("field to take the identity from", 2, "connection refused", &out);
}

#[test]
fn the_revocation_table_matches_the_log() {
    let f = fleet("");
    // Revoked by the listener's CRL file, and in the state: both refused in the handshake.
    let (cert, key) = f.store.paths(Kind::Device, "plc-2");
    let out = f.publish(Some((&cert, &key)), None, "plc-2");
    f.check("at the TLS handshake", 2, "handshake failed", &out);

    // Certificates without a credential get default rules: plc-1 connects, then is revoked.
    let add_to_state = |toml: &str| {
        let state = f.store.dir().parent().unwrap().join("auth.toml");
        let text = std::fs::read_to_string(&state).unwrap();
        std::fs::write(&state, format!("{text}{toml}")).unwrap();
        let status = Command::new("kill").args(["-HUP", &f.broker.pid().to_string()]).status().unwrap();
        assert!(status.success());
    };
    add_to_state("[defaults]\nunknown_certificate = \"default_rules\"\n");
    assert!(f.broker.wait_for_log("reloaded", Duration::from_secs(5)).is_some());
    let (cert, key) = f.store.paths(Kind::Device, "plc-1");
    let mut live =
        common::Raw::tls(f.broker.tls.unwrap(), rampart_node::mqtt::codec::ProtocolVersion::V5, &f.store.ca_cert(), (&cert, &key));
    live.handshake("plc-1");
    let serial = rampart_node::pki::serial_of(&rampart_node::pki::pem_to_der(&std::fs::read(&cert).unwrap()).unwrap()).unwrap();
    add_to_state(&format!("[[revocations]]\nissuer = \"O=Rampart, CN=Test Fleet CA\"\nserial = {serial:?}\n"));
    live.expect_close(Some(mqttbytes::v5::DisconnectReasonCode::AdministrativeAction));
    f.check("while connected", 2, "closing connection", "");

    let out = f.publish(Some((&cert, &key)), None, "plc-1");
    f.check("at the TLS handshake", 2, "handshake failed", &out);
}
