//! Client ids belong to names, cluster-wide: an anonymous client that leaves a session under a
//! device's client id on one node cannot lock the device out on another (issue 22, defect 1),
//! and once the device holds its session the anonymous client cannot take or resume it.

use std::process::{Command, Output};

use rampart_cluster_tests::mosquitto::{lines, Client};
use rampart_cluster_tests::{Options, TestCluster};

/// `mosquitto_sub` as an anonymous client over plain TCP on `node`, with client id `device-2`, a
/// persistent MQTT 5 session (an hour's expiry), for `seconds`.
fn anonymous_squatter(cluster: &TestCluster, node: u64, seconds: u64) -> Output {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cluster.node(node).ports.tcp.to_string(), "-V", "mqttv5"])
        .args(["-i", "device-2", "-c", "-x", "3600", "-t", "demo/#", "-W", &seconds.to_string()])
        .output()
        .expect("mosquitto_sub (Debian's mosquitto-clients; `bash scripts/test` installs it)")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_session_under_a_device_client_id_does_not_lock_the_device_out_on_another_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    // The squatter connects on node 3 and leaves its session there, offline for an hour.
    let squat = anonymous_squatter(&cluster, 3, 1);
    let squat_err = String::from_utf8_lossy(&squat.stderr);
    assert!(!squat_err.contains("Connection error"), "setup: the anonymous client connects: {squat_err}");

    // The device connects on node 1 with its persistent session: accepted (CONNACK 0x87 before),
    // and its session works.
    let device = Client { cluster: &cluster, node: 1, device: "device-2", client_id: "device-2", version: "mqttv5" };
    let mut args = device.args();
    args.extend(["-c", "-x", "3600", "-q", "1", "-t", "devices/device-2/#", "-v", "-C", "1", "-W", "15"].map(String::from));
    let subscriber =
        Command::new("mosquitto_sub").args(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    let publisher = Client { cluster: &cluster, node: 1, device: "device-2", client_id: "device-2-pub", version: "mqttv5" };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cluster.metric(1, "rampart_subscriptions") < 1 {
        assert!(std::time::Instant::now() < deadline, "device-2's subscription never appeared on node 1");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    publisher.publish("devices/device-2/cmd", 1, "reboot");
    assert_eq!(lines(subscriber), ["devices/device-2/cmd reboot"], "device-2 holds its own client id on node 1");
    let log = std::fs::read_to_string(&cluster.node(3).log)?;
    assert!(log.contains("session ended: its client id connected on another node"), "node 3 ended the squatter's session:\n{log}");

    // Now the session is the device's: the anonymous client can neither resume nor take it.
    let refused = anonymous_squatter(&cluster, 3, 1);
    let refused_err = String::from_utf8_lossy(&refused.stderr);
    assert!(refused_err.contains("Not authorized"), "an anonymous client asking for device-2's session: {refused_err}");
    Ok(())
}
