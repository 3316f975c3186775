//! Debian's `mosquitto_pub` / `mosquitto_sub` as test peers of a [`Broker`].

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Broker;

pub fn tool(name: &str) -> Command {
    let found = Command::new(name).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    assert!(found, "{name} is missing: run `bash scripts/test`, which installs mosquitto-clients");
    Command::new(name)
}

/// Connection arguments for `broker` over TCP, or TLS checked against its CA.
pub fn endpoint(broker: &Broker, tls: bool) -> Vec<String> {
    match tls {
        false => vec!["-h".into(), "127.0.0.1".into(), "-p".into(), broker.tcp.unwrap().port().to_string()],
        true => vec![
            "-h".into(),
            "localhost".into(),
            "-p".into(),
            broker.tls.unwrap().port().to_string(),
            "--cafile".into(),
            broker.ca_file().display().to_string(),
        ],
    }
}

/// Waits until the broker holds exactly `n` subscriptions.
pub fn wait_subscriptions(broker: &Broker, n: i64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.metric("rampart_subscriptions") != n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Starts `mosquitto_sub` and, when `subscriptions` is given, waits until the broker holds that
/// many subscriptions.
pub fn subscribe(broker: &Broker, tls: bool, args: &[&str], subscriptions: Option<i64>) -> Child {
    let mut child = tool("mosquitto_sub")
        .args(endpoint(broker, tls))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mosquitto_sub");
    if subscriptions.is_some_and(|n| !wait_subscriptions(broker, n)) {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!("mosquitto_sub {args:?} did not subscribe: {}", String::from_utf8_lossy(&out.stderr));
    }
    child
}

pub fn publish(broker: &Broker, tls: bool, args: &[&str]) {
    let mut command = tool("mosquitto_pub");
    command.args(endpoint(broker, tls)).args(args);
    let output = super::run_with_timeout(command, Duration::from_secs(20));
    assert!(output.status.success(), "mosquitto_pub {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// What a subscriber printed before it exited (it must exit by itself: `-C` / `-W`).
pub fn output(child: Child) -> String {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("mosquitto_sub did not exit")
    });
    String::from_utf8(out.expect("mosquitto_sub output").stdout).unwrap()
}
