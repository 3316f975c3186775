//! Revocation inside the TLS handshake, with real clients (`mosquitto_pub`, `mosquitto_sub`,
//! Python paho-mqtt) and certificates from the `rampart pki` CLI: a certificate revoked in the
//! authorization state — by serial, by identity regex and issuer, issued before a date — fails
//! the handshake on the TLS and WSS listeners with the alert `certificate_revoked`, while
//! unrevoked ones (also one the same rules spare) connect; a revocation arriving while a device
//! is connected still kicks it (MQTT 5 DISCONNECT 0x98) and its reconnection fails in the
//! handshake. Before issue 24 these clients passed the handshake and got CONNACK "not
//! authorized".

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Broker;

const ISSUER: &str = "O=Rampart, CN=Revocation Test CA";

struct Fleet {
    _dir: tempfile::TempDir,
    pki: PathBuf,
    state_file: PathBuf,
    broker: Broker,
}

/// `rampart pki --dir DIR ARGS`; its standard output.
fn pki(dir: &Path, args: &[&str]) -> String {
    let out = common::rampart().arg("pki").arg("--dir").arg(dir).args(args).output().expect("run rampart pki");
    assert!(out.status.success(), "rampart pki {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The state: every device may use `devices/#`, and the given revocations (TOML).
fn state(revocations: &str) -> String {
    format!("[defaults]\nunknown_certificate = \"default_rules\"\nrules = [{{ access = \"readWrite\", pattern = \"devices/#\" }}]\n{revocations}")
}

/// A `[[revocations]]` entry of the state file.
fn revocation(fields: &str) -> String {
    format!("\n[[revocations]]\n{fields}\n")
}

/// A CA, a server certificate for localhost and devices plc-1, plc-2, sensor-1 and gw-1; a
/// broker with mutual-TLS MQTT and WSS listeners whose state holds `revocations(serials)` (TOML;
/// the serials `rampart pki` printed, by device).
fn fleet(revocations: impl Fn(&HashMap<&str, String>) -> String) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir, &["init-ca", "--name", "Revocation Test CA"]);
    pki(&pki_dir, &["issue-server", "--name", "localhost", "--san", "localhost", "--san", "127.0.0.1"]);
    let serials = ["plc-1", "plc-2", "sensor-1", "gw-1"]
        .into_iter()
        .map(|device| {
            let printed = pki(&pki_dir, &["issue-device", device]);
            let serial = printed.lines().find_map(|l| l.trim().strip_prefix("serial")).expect("the serial is printed");
            (device, serial.trim().to_string())
        })
        .collect();
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, state(&revocations(&serials))).unwrap();
    let (cert, key, ca) = (pki_dir.join("servers/localhost.pem"), pki_dir.join("servers/localhost.key"), pki_dir.join("ca.pem"));
    let mut config = format!("[auth]\nstate_file = {state_file:?}\n");
    for section in ["tls", "wss"] {
        config.push_str(&format!(
            "[listeners.{section}]\nbind = \"127.0.0.1:0\"\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_certificate = \"required\"\nca_file = {ca:?}\n"
        ));
    }
    let broker = Broker::start_with(&config, 2);
    Fleet { _dir: dir, pki: pki_dir, state_file, broker }
}

impl Fleet {
    /// The connection arguments of the mosquitto clients for `device` (`-d`: the client's own
    /// debug lines, where OpenSSL's alert text appears).
    fn mosquitto(&self, tool: &str, device: &str, version: &str, client_id: &str) -> Command {
        let mut command = common::mosquitto::tool(tool);
        command
            .args(["-d", "-h", "localhost", "-p", &self.broker.tls.unwrap().port().to_string(), "-V", version, "-i", client_id])
            .arg("--cafile")
            .arg(self.pki.join("ca.pem"))
            .arg("--cert")
            .arg(self.pki.join(format!("devices/{device}.pem")))
            .arg("--key")
            .arg(self.pki.join(format!("devices/{device}.key")));
        command
    }

    /// `mosquitto_pub` of one QoS 1 message as `device`.
    fn publish(&self, device: &str, version: &str) -> Output {
        let mut command = self.mosquitto("mosquitto_pub", device, version, device);
        command.args(["-q", "1", "-t", "devices/x", "-m", "hello"]);
        common::run_with_timeout(command, Duration::from_secs(20))
    }

    /// Runs the paho-mqtt script `PAHO` with `args` after the CA and the PKI directory; its
    /// output lines.
    fn paho(&self, args: &[&str]) -> Vec<String> {
        let mut command = Command::new("python3");
        command.args(["-c", PAHO]).arg(self.pki.join("ca.pem")).arg(&self.pki).args(args);
        let out = common::run_with_timeout(command, Duration::from_secs(60));
        assert!(out.status.success(), "paho: {}{}", text(&out), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    fn tls_port(&self) -> String {
        self.broker.tls.unwrap().port().to_string()
    }

    fn wss_port(&self) -> String {
        self.broker.wss.unwrap().port().to_string()
    }

    /// Adds a revocation to the state file and has the broker re-read it (SIGHUP).
    fn revoke(&self, fields: &str) {
        let mut text = std::fs::read_to_string(&self.state_file).unwrap();
        text.push_str(&revocation(fields));
        std::fs::write(&self.state_file, text).unwrap();
        let status = Command::new("kill").args(["-HUP", &self.broker.pid().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits until the broker has `n` open client connections.
    fn wait_connections(&self, n: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.broker.metric("rampart_connections") != n {
            assert!(std::time::Instant::now() < deadline, "{} connections, not {n}", self.broker.metric("rampart_connections"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Standard output and error of a client.
fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What a mosquitto client refused in the handshake prints and returns: "connection lost"
/// (exit status 7, MOSQ_ERR_CONN_LOST) and OpenSSL's alert in its debug lines.
fn assert_handshake_refused(out: &Output, who: &str) {
    let printed = text(out);
    assert_eq!(out.status.code(), Some(7), "{who}: {printed}");
    assert!(printed.contains("Error: The connection was lost."), "{who}: {printed}");
    assert!(printed.contains("sslv3 alert certificate revoked"), "{who}: {printed}");
}

/// paho-mqtt clients; argv: CA, PKI directory, then `connect TRANSPORT PORT VERSION DEVICE`
/// (prints `connected <reason>`, or `refused <error>` when the handshake fails) or `kick …`
/// (the same, then after a line on standard input `disconnected <reason> <code>` when the broker
/// ends the connection, and what a reconnection gets).
const PAHO: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
ca, pki, action, transport, port, version, device = sys.argv[1:8]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device + "-paho",
                protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311, transport=transport)
c.tls_set(ca_certs=ca, certfile=f"{pki}/devices/{device}.pem", keyfile=f"{pki}/devices/{device}.key")
answered = threading.Event()
c.on_connect = lambda cl, u, f, rc, p: (print("connected", rc, flush=True), answered.set())
c.on_disconnect = lambda cl, u, f, rc, p: (print("disconnected", rc, getattr(rc, "value", rc), flush=True), answered.set())
# paho reports a socket error (a TLS alert read after connect() returned) only to its log.
c.on_log = lambda cl, u, level, msg: print("refused", msg, flush=True) if "failed to receive" in msg else None
def attempt():
    answered.clear()
    try:
        c.connect("localhost", int(port), 30)
    except Exception as e:
        print("refused", e, flush=True)
        return
    c.loop_start()
    answered.wait(10)
attempt()
if action == "kick":
    sys.stdin.readline()  # the test revokes, then writes a line
    answered.clear()
    answered.wait(10)
    c.loop_stop()
    attempt()
c.loop_stop()
"#;

#[test]
fn revoked_certificates_fail_the_handshake_for_mosquitto_and_unrevoked_ones_connect() {
    let now = rampart_node::clock::unix_now();
    let f = fleet(|serial| {
        [
            revocation(&format!("issuer = {ISSUER:?}\nserial = {:?}\nreason = \"keyCompromise\"", serial["plc-2"])),
            // A series issued before a date: sensor-1 is in it.
            revocation(&format!("issuer = {ISSUER:?}\nidentity_regex = \"sensor-[0-9]+\"\nissued_before = {}", now + 3600)),
            // gw-1 was issued after this one.
            revocation(&format!("identity_regex = \"gw-.*\"\nissued_before = {}", now - 86_400)),
        ]
        .concat()
    });
    for (device, rule) in [("plc-2", "serial"), ("sensor-1", "identity_regex \"sensor-[0-9]+\"")] {
        for version in ["mqttv311", "mqttv5"] {
            let out = f.publish(device, version);
            assert_handshake_refused(&out, &format!("{device} {version}"));
            assert!(!text(&out).contains("CONNACK"), "{device} {version} got as far as CONNACK: {}", text(&out));
            let line = f.broker.wait_for_log("handshake failed", Duration::from_secs(5)).expect("the refusal is logged");
            for field in [&format!("identity=\"{device}\""), "serial=\"", "reason=\"invalid peer certificate: Revoked\"", rule] {
                assert!(line.contains(field), "{field} missing from:\n{line}");
            }
            assert!(line.contains("revoked_by=state file revocation"), "{line}");
        }
    }
    for device in ["plc-1", "gw-1"] {
        let out = f.publish(device, "mqttv5");
        assert!(out.status.success(), "{device}: {}", text(&out));
        assert!(text(&out).contains("received CONNACK (0)"), "{}", text(&out));
    }
    assert_eq!(f.broker.metric("rampart_tls_handshakes_revoked_total"), 4);
    assert!(f.broker.metric("rampart_connections_refused_total") >= 4);
}

#[test]
fn paho_over_tls_and_wss_gets_the_certificate_revoked_alert() {
    let f = fleet(|serial| revocation(&format!("issuer = {ISSUER:?}\nserial = {:?}", serial["plc-2"])));
    for (transport, port) in [("tcp", f.tls_port()), ("websockets", f.wss_port())] {
        for version in ["3", "5"] {
            let lines = f.paho(&["connect", transport, &port, version, "plc-2"]);
            let refused = lines.iter().any(|l| l.starts_with("refused") && l.contains("SSLV3_ALERT_CERTIFICATE_REVOKED"));
            assert!(refused, "{transport} v{version}: {lines:?}");
            assert!(!lines.iter().any(|l| l.starts_with("connected")), "{transport} v{version} got a CONNACK: {lines:?}");
            let good = f.paho(&["connect", transport, &port, version, "plc-1"]);
            assert_eq!(good.first().map(String::as_str), Some("connected Success"), "{transport} v{version}: {good:?}");
        }
    }
    assert_eq!(f.broker.metric("rampart_tls_handshakes_revoked_total"), 4);
}

#[test]
fn a_revocation_while_connected_kicks_with_0x98_and_the_reconnection_fails_the_handshake() {
    let f = fleet(|_| String::new());
    let serial = {
        let der = rampart_node::pki::pem_to_der(&std::fs::read(f.pki.join("devices/plc-1.pem")).unwrap()).unwrap();
        rampart_node::pki::serial_of(&der).unwrap()
    };
    let spawn = |mut command: Command| command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut sub_v5 = f.mosquitto("mosquitto_sub", "plc-1", "mqttv5", "plc-1-v5");
    sub_v5.args(["-t", "devices/#", "-W", "30"]);
    let mut sub_v3 = f.mosquitto("mosquitto_sub", "plc-1", "mqttv311", "plc-1-v3");
    sub_v3.args(["-t", "devices/#", "-W", "30"]);
    let (sub_v5, sub_v3) = (spawn(sub_v5), spawn(sub_v3));
    let mut paho = Command::new("python3");
    paho.args(["-c", PAHO]).arg(f.pki.join("ca.pem")).arg(&f.pki).args(["kick", "websockets", &f.wss_port(), "5", "plc-1"]);
    let mut paho = spawn(paho);
    f.wait_connections(3);

    f.revoke(&format!("issuer = {ISSUER:?}\nserial = {serial:?}\nreason = \"keyCompromise\""));
    use std::io::Write;
    paho.stdin.take().unwrap().write_all(b"revoked\n").unwrap();

    // mosquitto_sub 5.0 prints the reason code and ends.
    let out = sub_v5.wait_with_output().unwrap();
    assert!(text(&out).contains("Received DISCONNECT (152)"), "{}", text(&out));
    // mosquitto_sub 3.1.1 is closed without a reason and reconnects: refused in the handshake.
    let out = sub_v3.wait_with_output().unwrap();
    assert_handshake_refused(&out, "mosquitto_sub 3.1.1 reconnecting");
    // paho 5.0 over WSS: DISCONNECT 0x98, then its reconnection is refused.
    let out = paho.wait_with_output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.first().map(String::as_str), Some("connected Success"), "{lines:?}");
    assert_eq!(lines.get(1).map(String::as_str), Some("disconnected Administrative action 152"), "{lines:?}");
    assert!(lines[2..].iter().any(|l| l.starts_with("refused") && l.contains("SSLV3_ALERT_CERTIFICATE_REVOKED")), "{lines:?}");

    let kicked = f.broker.wait_for_log("closing connection", Duration::from_secs(5)).expect("the kick is logged");
    assert!(kicked.contains("AdministrativeAction") && kicked.contains("is revoked (keyCompromise)"), "{kicked}");
    assert_handshake_refused(&f.publish("plc-1", "mqttv5"), "a new plc-1 connection");
    assert!(f.broker.metric("rampart_tls_handshakes_revoked_total") >= 3);
}
