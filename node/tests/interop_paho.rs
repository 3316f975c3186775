//! Runs the Python paho-mqtt suite (`tests/python/paho_suite.py`, MQTT 3.1.1 and 5.0 over TCP,
//! TLS, WebSocket and secure WebSocket) against a real broker process.

mod common;

use std::process::Command;
use std::time::Duration;

#[test]
fn paho_suite_passes() {
    let has_paho = Command::new("python3").args(["-c", "import paho.mqtt"]).status().is_ok_and(|s| s.success());
    assert!(has_paho, "Python paho-mqtt is missing: run `bash scripts/test`, which installs it");
    let broker = common::Broker::start(common::Options { all_listeners: true, limits: "max_keep_alive_secs = 3600" });
    let env = [("RAMPART_TCP", broker.tcp), ("RAMPART_TLS", broker.tls), ("RAMPART_WS", broker.ws), ("RAMPART_WSS", broker.wss)];
    let suite = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/paho_suite.py");
    let mut command = Command::new("python3");
    command.args([suite, "-v"]).env("RAMPART_CA", broker.ca_file());
    for (name, addr) in env {
        command.env(name, addr.expect("listener").to_string());
    }
    let output = common::run_with_timeout(command, Duration::from_secs(180));
    assert!(
        output.status.success(),
        "paho suite failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
