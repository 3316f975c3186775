//! Real MQTT peers for cluster tests: `mosquitto_sub` / `mosquitto_pub` (Debian's
//! mosquitto-clients) over mutual TLS as a development device, on any node of a [`TestCluster`].

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestCluster;

/// A mosquitto client of one device on one node.
pub struct Client<'a> {
    pub cluster: &'a TestCluster,
    pub node: u64,
    pub device: &'a str,
    pub client_id: &'a str,
    /// `mqttv5` or `mqttv311`.
    pub version: &'a str,
}

impl Client<'_> {
    pub fn args(&self) -> Vec<String> {
        let (_, cert, key) = self.cluster.pki.devices.iter().find(|(n, _, _)| n == self.device).expect("a development device");
        [
            "-h",
            "localhost",
            "-p",
            &self.cluster.node(self.node).ports.mtls.to_string(),
            "--cafile",
            &self.cluster.pki.ca_cert.display().to_string(),
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "-i",
            self.client_id,
            "-V",
            self.version,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts `mosquitto_sub`, printing `topic payload` lines, until `count` messages or
    /// `timeout_secs`.
    pub fn subscribe(&self, filter: &str, qos: u8, count: usize, timeout_secs: u64) -> Child {
        Command::new("mosquitto_sub")
            .args(self.args())
            .args(["-t", filter, "-q", &qos.to_string(), "-v", "-C", &count.to_string(), "-W", &timeout_secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (Debian's mosquitto-clients; `bash scripts/test` installs it)")
    }

    /// Starts `mosquitto_pub -l`: each line written to its stdin is published to `topic`.
    pub fn line_publisher(&self, topic: &str, qos: u8) -> Child {
        Command::new("mosquitto_pub")
            .args(self.args())
            .args(["-t", topic, "-q", &qos.to_string(), "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_pub")
    }

    pub fn publish(&self, topic: &str, qos: u8, payload: &str) {
        let out = Command::new("mosquitto_pub")
            .args(self.args())
            .args(["-t", topic, "-q", &qos.to_string(), "-m", payload])
            .output()
            .expect("mosquitto_pub");
        assert!(out.status.success(), "mosquitto_pub {topic}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The lines a finished `mosquitto_sub` printed.
pub fn lines(child: Child) -> Vec<String> {
    let out = child.wait_with_output().expect("mosquitto_sub output");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Waits until `node` has learned at least `routes` filters from `peer` (the route barrier a
/// test needs before it publishes: a subscription is announced asynchronously).
pub fn wait_for_routes(cluster: &TestCluster, node: u64, peer: u64, routes: i64) {
    let series = format!("rampart_forward_peer_routes{{peer=\"{peer}\"}}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.metric(node, &series) < routes {
        assert!(Instant::now() < deadline, "node {node} did not learn {routes} route(s) from node {peer}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `mosquitto_sub` arguments for device-1's persistent session (client id `device-1`, MQTT 5,
/// an hour's session expiry) on `node`, subscribed to `filter`.
pub fn persistent_subscription(cluster: &TestCluster, node: u64, qos: u8, filter: &str) -> Vec<String> {
    let client = Client { cluster, node, device: "device-1", client_id: "device-1", version: "mqttv5" };
    let mut args = client.args();
    args.extend(["-c", "-x", "3600", "-q", &qos.to_string(), "-t", filter, "-v"].map(String::from));
    args
}
