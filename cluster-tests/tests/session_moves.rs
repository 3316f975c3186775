//! Sessions move between nodes without losing what was acknowledged: a session larger than a link
//! frame travels in pieces, and a session whose new node cannot take it (the CONNECT there is
//! refused after the old node released it) stays resumable where it was.

use std::process::Command;

use rampart_cluster_tests::mosquitto::{persistent_subscription, Client};
use rampart_cluster_tests::{Options, TestCluster};

/// Makes device-1 an APPLICATION client: its sessions are durable and a publisher's PUBACK for a
/// message queued for them waits for the disk write.
fn device_1_is_an_application(cluster: &TestCluster) {
    let put = cluster.cli(
        1,
        &[
            "--wait",
            "credential",
            "put",
            "--name",
            "device-1",
            "--identity",
            "device-1",
            "--client-type",
            "application",
            "--allow",
            "readwrite:devices/%u/#",
        ],
    );
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
}

/// `mosquitto_sub` of device-1's persistent session on `node`, printing `topic length` lines, until
/// `count` messages or `seconds`.
fn resume(cluster: &TestCluster, node: u64, filter: &str, count: usize, seconds: u64) -> std::process::Output {
    let format = ["-F", "%t %l", "-C", &count.to_string(), "-W", &seconds.to_string()];
    Command::new("mosquitto_sub").args(persistent_subscription(cluster, node, 1, filter)).args(format).output().expect("mosquitto_sub")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_bigger_than_a_link_frame_moves_whole_with_every_acknowledged_message() -> anyhow::Result<()> {
    const MESSAGES: usize = 20;
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    device_1_is_an_application(&cluster);
    let filter = "devices/device-1/big/#";
    let left = Command::new("mosquitto_sub").args(persistent_subscription(&cluster, 1, 1, filter)).args(["-W", "1"]).output()?;
    assert!(left.stdout.is_empty(), "{}", String::from_utf8_lossy(&left.stderr));
    // 20 MB queued on node 1, each message acknowledged after it was on disk there.
    let blob = cluster.dir.path().join("blob");
    std::fs::write(&blob, vec![b'x'; 1_000_000])?;
    let publisher = Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" };
    for i in 0..MESSAGES {
        let topic = format!("devices/device-1/big/{i:02}");
        let out = Command::new("mosquitto_pub").args(publisher.args()).args(["-t", &topic, "-q", "1", "-f"]).arg(&blob).output()?;
        assert!(out.status.success(), "publish {topic}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The client comes back on node 3: the whole session follows it, in order, once each.
    let resumed = resume(&cluster, 3, filter, MESSAGES + 1, 10);
    let got: Vec<String> = String::from_utf8_lossy(&resumed.stdout).lines().map(str::to_string).collect();
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("devices/device-1/big/{i:02} 1000000")).collect();
    assert_eq!(got, want, "{}", String::from_utf8_lossy(&resumed.stderr));
    let log = std::fs::read_to_string(&cluster.node(1).log)?;
    assert!(log.contains("session handed to another node"), "node 1 gave the session up");
    assert!(!log.contains("taken back"), "the move was settled:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_refused_after_the_old_node_released_the_session_leaves_it_resumable_there() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options { limits: "max_sessions_per_identity = 3", ..Options::default() })?;
    cluster.wait_until_serving().await?;
    device_1_is_an_application(&cluster);
    let filter = "devices/device-1/jobs/#";
    let left = Command::new("mosquitto_sub").args(persistent_subscription(&cluster, 1, 1, filter)).args(["-W", "1"]).output()?;
    assert!(left.stdout.is_empty(), "{}", String::from_utf8_lossy(&left.stderr));
    let publisher = Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" };
    for n in 1..=3 {
        publisher.publish(&format!("devices/device-1/jobs/{n}"), 1, &format!("job {n}"));
    }
    // On node 3 device-1 already holds as many sessions as it may.
    for holder in ["device-1-holder-1", "device-1-holder-2", "device-1-holder-3"] {
        let client = Client { cluster: &cluster, node: 3, device: "device-1", client_id: holder, version: "mqttv5" };
        let out = Command::new("mosquitto_sub").args(client.args()).args(["-c", "-x", "3600", "-t", filter, "-W", "1"]).output()?;
        assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Node 1 releases the session for the CONNECT on node 3, which then refuses it.
    let refused = resume(&cluster, 3, filter, 1, 5);
    let log3 = std::fs::read_to_string(&cluster.node(3).log)?;
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{:?} {}\n{log3}",
        refused.status,
        String::from_utf8_lossy(&refused.stderr)
    );
    let log = std::fs::read_to_string(&cluster.node(3).log)?;
    assert!(log.contains("already holds 3 sessions"), "node 3 refused for the session limit");
    // The session is still on node 1, with every message it had.
    let resumed = resume(&cluster, 1, filter, 4, 10);
    let got: Vec<String> = String::from_utf8_lossy(&resumed.stdout).lines().map(str::to_string).collect();
    assert_eq!(got, ["devices/device-1/jobs/1 5", "devices/device-1/jobs/2 5", "devices/device-1/jobs/3 5"]);
    let log = std::fs::read_to_string(&cluster.node(1).log)?;
    assert!(log.contains("moved session taken back"), "node 1 took the session back");
    Ok(())
}
