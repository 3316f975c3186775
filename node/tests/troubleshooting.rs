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
    /// that starts with `log_start`, and the client column's spans marked as mosquitto output
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
        for span in cells[0].split("mosquitto: ").skip(1).filter_map(|s| quoted(s).into_iter().next()) {
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
    f.check("Revoked", 1, "handshake failed", &out);

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

/// The exit status and everything printed of a client that must end by itself within 10 s.
fn exited(child: std::process::Child) -> (Option<i32>, String) {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| {
        // SAFETY: kill(2) on a client this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        panic!("the client did not end by itself")
    });
    let out = out.unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The text and exit status the revocation table gives for `client` (a row key).
fn revocation_row(client: &str) -> (Vec<String>, i32) {
    let cells = row(client);
    (quoted(&cells[1]), cells[2].parse().unwrap_or_else(|_| panic!("{client}: exit status {:?}", cells[2])))
}

/// "A revocation, as a connected client sees it": mosquitto_sub v5 and v3 connected when their
/// certificate is revoked, and mosquitto_pub v5 and v3 connecting afterwards, print and exit
/// as the table says.
#[test]
fn the_revocation_table_matches_what_mosquitto_shows() {
    let f = fleet("");
    // Every certificate of the fleet CA may use devices/<its name>/#; then plc-1 is revoked.
    let state = f.store.dir().parent().unwrap().join("auth.toml");
    let reload = |append: &str| {
        let text = std::fs::read_to_string(&state).unwrap() + append;
        std::fs::write(&state, text).unwrap();
        // SAFETY: kill(2) on the broker this test started.
        unsafe { libc::kill(f.broker.pid() as libc::pid_t, libc::SIGHUP) };
    };
    reload("\n[defaults]\nunknown_certificate = \"default_rules\"\nrules = [{ access = \"readWrite\", pattern = \"devices/%u/#\" }]\n");
    assert!(f.broker.wait_for_log("reloaded", Duration::from_secs(10)).is_some());
    let (cert, key) = f.store.paths(Kind::Device, "plc-1");
    let tls = |tool: &str, client_id: &str, v5: bool| {
        let mut command = Command::new(tool);
        command.args(["-h", "localhost", "-p", &f.broker.tls.unwrap().port().to_string(), "--cafile"]).arg(f.store.ca_cert());
        command.arg("--cert").arg(&cert).arg("--key").arg(&key).args(["-i", client_id]);
        if v5 {
            command.args(["-V", "mqttv5"]);
        }
        command
    };
    let subscribers: Vec<(&str, std::process::Child)> =
        [("`mosquitto_sub -V mqttv5`", "plc-1", true), ("`mosquitto_sub` (MQTT 3.1.1", "plc-1-b", false)]
            .into_iter()
            .map(|(row_key, client_id, v5)| {
                let child = tls("mosquitto_sub", client_id, v5)
                    .args(["-t", "devices/plc-1/#"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (row_key, child)
            })
            .collect();
    for _ in 0..2 {
        if f.broker.wait_for_log("client connected", Duration::from_secs(10)).is_none() {
            let outputs: Vec<String> = subscribers
                .into_iter()
                .map(|(_, mut c)| {
                    let _ = c.kill();
                    exited(c).1
                })
                .collect();
            panic!("a subscriber did not connect: {outputs:?}");
        }
    }
    reload("\n[[revocations]]\nidentity_regex = \"plc-1\"\nreason = \"keyCompromise\"\n");
    let doc = DOC.lines().find(|l| l.contains("node closes the client's live connections")).expect("the revocation paragraph");
    let logged = quoted(doc).into_iter().find(|q| q.starts_with("closing connection")).expect("the log line the paragraph quotes");
    let line = f.broker.wait_for_log("closing connection", Duration::from_secs(10)).expect("no closing connection line");
    assert!(contains_in_order(&line, &logged), "the doc quotes `{logged}`, the log says:\n{line}");
    for (row_key, child) in subscribers {
        let out = exited(child);
        let (printed, status) = revocation_row(row_key);
        assert_eq!(out.0, Some(status), "{row_key}: {}", out.1);
        for span in printed {
            assert!(out.1.contains(&span), "{row_key}: the doc says it prints `{span}`, it printed:\n{}", out.1);
        }
        if row_key.contains("mqttv5") {
            assert!(out.1.trim().is_empty(), "{row_key} prints nothing: {}", out.1);
        }
    }
    for (row_key, v5) in [("`mosquitto_pub -V mqttv5`", true), ("`mosquitto_pub`, connecting", false)] {
        let mut command = tls("mosquitto_pub", "plc-1", v5);
        command.args(["-t", "devices/plc-1/x", "-m", "revoked"]);
        let out = common::run_with_timeout(command, Duration::from_secs(20));
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let (spans, status) = revocation_row(row_key);
        assert_eq!(out.status.code(), Some(status), "{row_key}: {printed}");
        for span in spans {
            assert!(printed.contains(&span), "{row_key}: the doc says it prints `{span}`, it printed:\n{printed}");
        }
    }
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
