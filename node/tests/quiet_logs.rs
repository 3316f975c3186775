//! What a healthy node does not log: rustls' "Illegal SNI" warning for a client that connects to
//! an IP address (mosquitto then sends the address as SNI, which rustls rightly ignores).

mod common;

use std::time::Duration;

use common::{mosquitto, Broker, Options};

#[test]
fn a_client_connecting_to_an_ip_address_adds_no_sni_warning() {
    let broker = Broker::start(Options { all_listeners: true, ..Default::default() });
    let port = broker.tls.unwrap().port().to_string();
    let ca = broker.ca_file().display().to_string();
    let mut command = mosquitto::tool("mosquitto_pub");
    command.args(["-h", "127.0.0.1", "-p", &port, "--cafile", &ca, "-i", "by-address", "-t", "t", "-m", "m"]);
    let output = common::run_with_timeout(command, Duration::from_secs(20));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // Everything logged up to the client's disconnect, which comes after its handshake.
    let mut logged = Vec::new();
    while let Ok(line) = broker.logs.recv_timeout(Duration::from_secs(10)) {
        let done = line.contains("client disconnected") && line.contains("by-address");
        logged.push(line);
        if done {
            break;
        }
    }
    assert!(logged.iter().any(|l| l.contains("client disconnected")), "{}", logged.join("\n"));
    assert!(!logged.iter().any(|l| l.contains("SNI") || l.contains(" WARN ")), "{}", logged.join("\n"));
}
