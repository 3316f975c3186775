//! SCRAM-SHA-256/512 (MQTT 5 enhanced authentication) against the real binary: the Python suite
//! `tests/python/scram_suite.py` (paho-mqtt packets, scramp SCRAM) connects with both mechanisms,
//! re-authenticates, and is refused for a wrong password, a replayed final message and an
//! unknown method; raw packets check what paho cannot send.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Broker, Raw};
use mqttbytes::v5::{self, ConnectReturnCode};
use rampart_node::auth::scram::{Mechanism, Verifier};
use rampart_node::mqtt::codec::ProtocolVersion::V5;
use rampart_node::mqtt::codec::{Auth, AuthReason, Packet};

const USER: &str = "scram-app";
/// Not ASCII: a no-break space and an umlaut, so SASLprep on both sides is exercised.
const PASSWORD: &str = "correct\u{00A0}horse battery st\u{00E4}ple";

/// A broker whose state (in the returned directory) has the SCRAM credential and `order`.
fn start(order: &str) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sha256 = Verifier::generate(Mechanism::Sha256, PASSWORD, 4096).unwrap();
    let sha512 = Verifier::generate(Mechanism::Sha512, PASSWORD, 8192).unwrap();
    let state = format!(
        "[providers]\norder = {order}\n\n[[credentials]]\nname = \"scram-app\"\npassword = {{ username = \"{USER}\", scram_sha256 = \"{sha256}\", scram_sha512 = \"{sha512}\" }}\nrules = [{{ access = \"write\", pattern = \"scram/%u/#\" }}]\n"
    );
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, state).unwrap();
    (Broker::start_with(&format!("[auth]\nstate_file = {state_file:?}\n"), 0), dir)
}

fn scram_connect(method: &str, client_first: &str) -> v5::Connect {
    let mut connect = v5::Connect::new("raw-scram");
    connect.properties = Some(v5::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: Some(method.into()),
        authentication_data: Some(client_first.as_bytes().to_vec().into()),
    });
    connect
}

#[test]
fn the_python_scram_suite_passes() {
    let has_deps = Command::new("python3").args(["-c", "import paho.mqtt, scramp"]).status().is_ok_and(|s| s.success());
    assert!(has_deps, "Python paho-mqtt or scramp is missing: run `bash scripts/test`, which installs them");
    let (broker, _state) = start(r#"["x509", "scram"]"#);
    let suite = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/scram_suite.py");
    let mut command = Command::new("python3");
    command
        .args([suite, "-v"])
        .env("RAMPART_TCP", broker.tcp.unwrap().to_string())
        .env("RAMPART_SCRAM_USER", USER)
        .env("RAMPART_SCRAM_PASSWORD", PASSWORD);
    let output = common::run_with_timeout(command, Duration::from_secs(120));
    assert!(
        output.status.success(),
        "scram suite failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn scram_disabled_or_out_of_sequence_is_refused() {
    let (disabled, _state) = start(r#"["x509", "basic"]"#);
    let code = Raw::socket(disabled.tcp.unwrap(), V5).connack_with(scram_connect("SCRAM-SHA-256", "n,,n=scram-app,r=abc"));
    assert_eq!(code, ConnectReturnCode::BadAuthenticationMethod, "scram not in the chain");

    let (broker, _other_state) = start(r#"["scram"]"#);
    let tcp = broker.tcp.unwrap();
    let code = Raw::socket(tcp, V5).connack_with(scram_connect("SCRAM-SHA-256", "garbage"));
    assert_eq!(code, ConnectReturnCode::NotAuthorized, "a malformed client-first-message");
    // Anything but AUTH (continue) after the server-first-message ends the attempt.
    let mut raw = Raw::socket(tcp, V5);
    raw.send_packet(&Packet::Connect(scram_connect("SCRAM-SHA-256", "n,,n=scram-app,r=abc")));
    match raw.recv() {
        Some(Packet::Auth(Auth { reason: AuthReason::ContinueAuthentication, data: Some(data), .. })) => {
            assert!(String::from_utf8_lossy(&data).starts_with("r=abc"), "the server nonce extends the client's")
        }
        other => panic!("expected AUTH continue, got {other:?}"),
    }
    raw.send_packet(&Packet::PingReq);
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::ProtocolError),
        other => panic!("expected CONNACK 0x82, got {other:?}"),
    }
    let line = broker.wait_for_log("expected AUTH", Duration::from_secs(5)).expect("logged");
    assert!(line.contains("connection refused"), "{line}");
}
