//! One broker across the cluster: a publish on one node reaches subscribers on the others over
//! the QUIC forwarding links, with real `mosquitto_sub` / `mosquitto_pub` clients over mutual TLS,
//! MQTT 3.1.1 and 5, QoS 0–2; the receiving node checks each subscriber's read permission; a
//! killed and restarted node's routes and links come back; shared groups span the nodes; wills
//! reach other nodes; the SUBACK barrier and the `cluster` PUBACK policy; QoS 2 through a lossy,
//! slow link.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqttbytes::v5::PubAckReason;
use rampart_cluster_tests::mosquitto::{lines, persistent_subscription, wait_for_routes, Client};
use rampart_cluster_tests::{mqtt_connect, Options, TestCluster};
use rampart_node::mqtt::codec::Packet;

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_node_1_reaches_subscribers_on_nodes_2_and_3() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let mut subscribers = Vec::new();
    for (node, version) in [(2, "mqttv5"), (3, "mqttv311")] {
        for qos in 0..=2u8 {
            let filter = format!("devices/device-1/q{qos}/+");
            let client_id = format!("device-1-sub-{node}-{qos}");
            let client = Client { cluster: &cluster, node, device: "device-1", client_id: &client_id, version };
            subscribers.push(((node, version, qos), client.subscribe(&filter, qos, 2, 20)));
        }
    }
    for peer in [2, 3] {
        wait_for_routes(&cluster, 1, peer, 3);
    }
    for qos in 0..=2u8 {
        for (version, n) in [("mqttv5", 1), ("mqttv311", 2)] {
            let topic = format!("devices/device-1/q{qos}/m{n}");
            let client_id = format!("device-1-pub-{qos}-{n}");
            Client { cluster: &cluster, node: 1, device: "device-1", client_id: &client_id, version }.publish(
                &topic,
                qos,
                &format!("hello {n}"),
            );
        }
    }
    for ((node, version, qos), child) in subscribers {
        let got = lines(child);
        let expected = [format!("devices/device-1/q{qos}/m1 hello 1"), format!("devices/device-1/q{qos}/m2 hello 2")];
        assert_eq!(got, expected, "node {node}, {version}, QoS {qos}");
    }
    assert!(cluster.metric(1, "rampart_forward_link_up{peer=\"2\"}") == 1);
    // The links as `rampart admin cluster status` shows them, answered by node 1.
    let status = cluster.admin(1).await?.cluster_status(rampart_proto::admin::ClusterStatusRequest {}).await?.into_inner();
    for member in status.members.iter().filter(|m| m.id != 1) {
        assert!(member.link_up && member.link_forwarded >= 6 && member.link_dropped == 0, "{member:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_receiving_node_checks_each_subscribers_read_permission() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    // device-2 may read devices/device-2/# only; its wildcard is granted (one topic under it is
    // readable) and everything else is withheld where it is delivered: on node 2.
    let client = |node, device, client_id| Client { cluster: &cluster, node, device, client_id, version: "mqttv5" };
    let watcher = client(2, "device-2", "device-2-watch").subscribe("devices/+/status", 1, 1, 8);
    wait_for_routes(&cluster, 1, 2, 1);
    client(1, "device-1", "device-1-pub").publish("devices/device-1/status", 1, "not for device-2");
    client(1, "device-2", "device-2-pub").publish("devices/device-2/status", 1, "mine");
    assert_eq!(lines(watcher), ["devices/device-2/status mine"]);
    let withheld = cluster.metric(2, "rampart_messages_dropped_total{reason=\"read_not_authorized\"}");
    assert_eq!(withheld, 1, "node 2 withheld device-1's message");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_gets_its_routes_and_links_back() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let before = Client { cluster: &cluster, node: 2, device: "device-1", client_id: "device-1-before", version: "mqttv5" };
    let mut first = before.subscribe("devices/device-1/before", 1, 1, 20);
    wait_for_routes(&cluster, 1, 2, 1);
    let _ = first.kill();
    first.wait()?;
    cluster.kill(2);
    cluster.start_node(2)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.readyz(2).is_ok_and(|r| r.contains("ready") && !r.contains("not")) {
        assert!(Instant::now() < deadline, "node 2 did not become ready after its restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The restarted node announces a fresh snapshot: the old route is gone, the new one comes.
    let client = |node, client_id| Client { cluster: &cluster, node, device: "device-1", client_id, version: "mqttv5" };
    let after = client(2, "device-1-after").subscribe("devices/device-1/after", 1, 1, 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = cluster.metric(1, "rampart_forward_link_up{peer=\"2\"}") == 1;
        let routes = cluster.metric(1, "rampart_forward_peer_routes{peer=\"2\"}");
        if up && routes == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 never saw node 2's new routes (up {up}, routes {routes})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client(1, "device-1-pub").publish("devices/device-1/after", 1, "back");
    assert_eq!(lines(after), ["devices/device-1/after back"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_link_loses_no_qos1_message_and_delivers_none_twice() -> anyhow::Result<()> {
    use std::io::Write;
    const MESSAGES: usize = 300;
    // Node 2 is reached through a relay the test cuts for longer than the link's idle timeout:
    // the link dies, the sender reconnects and re-sends what node 2 did not acknowledge.
    let options = Options { quic_relay: Some(2), link_idle_timeout_ms: 1000, ..Options::default() };
    let cluster = TestCluster::start(options)?;
    cluster.wait_until_serving().await?;
    let client = |node, client_id| Client { cluster: &cluster, node, device: "device-1", client_id, version: "mqttv5" };
    let subscriber = client(2, "device-1-sub").subscribe("devices/device-1/seq", 1, MESSAGES, 90);
    // A subscriber on the publishing node: the dead peer must not stall it.
    let local = client(1, "device-1-local").subscribe("devices/device-1/seq", 1, MESSAGES, 90);
    wait_for_routes(&cluster, 1, 2, 1);
    let mut publisher = client(1, "device-1-pub").line_publisher("devices/device-1/seq", 1);
    let mut lines_in = publisher.stdin.take().expect("stdin");
    let relay = cluster.relay.as_ref().expect("relay");
    for n in 1..=MESSAGES {
        if n == MESSAGES / 3 {
            relay.cut(true);
        }
        if n == 2 * MESSAGES / 3 {
            // Long enough for the link to be declared dead and for reconnects to fail.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            relay.cut(false);
        }
        writeln!(lines_in, "{n}").expect("mosquitto_pub reads its input");
        if n % 20 == 0 {
            lines_in.flush().expect("mosquitto_pub reads its input");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(lines_in);
    assert!(publisher.wait().expect("mosquitto_pub ends").success(), "mosquitto_pub");
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("devices/device-1/seq {n}")).collect();
    assert_eq!(lines(local), expected, "the local subscriber got everything meanwhile");
    assert_eq!(lines(subscriber), expected, "every message once, in order");
    assert!(cluster.metric(1, "rampart_forward_dropped_total{peer=\"2\"}") == 0);
    let log = std::fs::read_to_string(&cluster.node(1).log)?;
    let downs = log.lines().filter(|l| l.contains("forwarding link down") && l.contains("peer=2")).count();
    assert!(downs >= 1, "the cut must have killed the link (and the messages come by replay):\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_id_is_unique_across_the_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let (_, cert, key) = cluster.pki.devices.iter().find(|(n, _, _)| n == "device-1").expect("device-1");
    let (code, on_node_1) =
        rampart_cluster_tests::mqtt_connect(cluster.node(1).ports.mtls, &cluster.pki.ca_cert, cert, key, "device-1").await?;
    assert_eq!(code, 0);
    // The same client id on node 2: node 1's connection is taken over (MQTT 5 DISCONNECT 0x8E).
    let client = Client { cluster: &cluster, node: 2, device: "device-1", client_id: "device-1", version: "mqttv5" };
    client.publish("devices/device-1/here", 0, "node 2 now");
    let (_, reason) = on_node_1.wait_disconnect(Duration::from_secs(10)).await?;
    assert_eq!(reason, Some(0x8E), "taken over from node 2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_session_moves_to_the_node_its_client_reconnects_to() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let persistent = |node| persistent_subscription(&cluster, node, 1, "devices/device-1/jobs/#");
    // Subscribe on node 1, leave the session behind (-W ends the client normally).
    let setup = Command::new("mosquitto_sub").args(persistent(1)).args(["-W", "1"]).output()?;
    assert!(setup.stdout.is_empty(), "{}", String::from_utf8_lossy(&setup.stderr));
    for n in 1..=3 {
        Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" }.publish(
            &format!("devices/device-1/jobs/{n}"),
            1,
            &format!("job {n}"),
        );
    }
    // Reconnect on node 2: the session, with its three queued messages, comes along.
    let resumed = Command::new("mosquitto_sub").args(persistent(2)).args(["-C", "3", "-W", "20"]).output()?;
    let got: Vec<String> = String::from_utf8_lossy(&resumed.stdout).lines().map(str::to_string).collect();
    assert_eq!(got, ["devices/device-1/jobs/1 job 1", "devices/device-1/jobs/2 job 2", "devices/device-1/jobs/3 job 3"]);
    // Now subscribed on node 2, the session receives what node 1 publishes through the link.
    let live = Command::new("mosquitto_sub").args(persistent(2)).args(["-C", "1", "-W", "20"]).stdout(Stdio::piped()).spawn()?;
    wait_for_routes(&cluster, 1, 2, 1);
    Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" }.publish(
        "devices/device-1/jobs/4",
        1,
        "job 4",
    );
    assert_eq!(lines(live), ["devices/device-1/jobs/4 job 4"]);
    let log = std::fs::read_to_string(&cluster.node(1).log)?;
    assert!(log.contains("session handed to another node"), "node 1 gave the session up:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_messages_reach_every_node_and_a_restarted_one_gets_them_back() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let publisher = Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" };
    let retain = |topic: &str, payload: &str| {
        let out = Command::new("mosquitto_pub").args(publisher.args()).args(["-t", topic, "-q", "1", "-r", "-m", payload]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "retained publish on {topic}");
    };
    retain("devices/device-1/status", "on");
    retain("devices/device-1/cleared", "soon gone");
    retain("devices/device-1/cleared", "");
    let read_retained = |cluster: &TestCluster, node: u64| {
        let reader = Client { cluster, node, device: "device-1", client_id: "device-1-reader", version: "mqttv5" };
        lines(reader.subscribe("devices/device-1/#", 1, 2, 3))
    };
    // No subscriber anywhere: a retained message still reaches every node's store.
    for node in [2, 3] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = read_retained(&cluster, node);
            if got == ["devices/device-1/status on"] {
                break;
            }
            assert!(Instant::now() < deadline, "node {node} has {got:?}");
        }
    }
    cluster.kill(2);
    cluster.start_node(2)?;
    cluster.wait_until_serving().await?;
    // Node 2 lost its memory; the links' retained snapshots bring the message back (and not the
    // cleared one).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = read_retained(&cluster, 2);
        if got == ["devices/device-1/status on"] {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted node 2 has {got:?}");
    }
    Ok(())
}

/// Twenty retained messages of 1 MB are more than one link frame may carry (16 MiB): the
/// retained snapshot a link sends when it connects travels in pieces, so a restarted node gets
/// every one of them, its links come up and stay up, and later publishes reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_retained_store_bigger_than_a_frame_reaches_a_restarted_node_and_its_link_stays_up() -> anyhow::Result<()> {
    const BLOBS: usize = 20;
    let mut cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let blob = cluster.dir.path().join("blob");
    std::fs::write(&blob, vec![b'x'; 1_000_000])?;
    let publisher = Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" };
    // In two groups: one session is sent at most 16 MiB of retained messages per SUBSCRIBE.
    let topic_of = |i: usize| format!("devices/device-1/blob/{}/{i}", ["a", "b"][i % 2]);
    for i in 0..BLOBS {
        let topic = topic_of(i);
        let out = Command::new("mosquitto_pub").args(publisher.args()).args(["-t", &topic, "-q", "1", "-r", "-f"]).arg(&blob).output()?;
        assert!(out.status.success(), "retained publish on {topic}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let publisher_args = publisher.args();
    cluster.kill(3);
    cluster.start_node(3)?;
    cluster.wait_until_serving().await?;
    // The snapshot streams in after the links are up (20 MB take a moment).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.metric(3, "rampart_retained_messages") < BLOBS as i64 {
        assert!(Instant::now() < deadline, "node 3 has {} retained messages", cluster.metric(3, "rampart_retained_messages"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reader = Client { cluster: &cluster, node: 3, device: "device-1", client_id: "device-1-reader", version: "mqttv5" };
    let mut got = Vec::new();
    for group in ["a", "b"] {
        let filter = format!("devices/device-1/blob/{group}/+");
        let args = ["-t", &filter, "-q", "1", "-F", "%t %l", "-C", &(BLOBS / 2).to_string(), "-W", "20"];
        let retained = Command::new("mosquitto_sub").args(reader.args()).args(args).output()?;
        got.extend(String::from_utf8_lossy(&retained.stdout).lines().map(str::to_string));
    }
    got.sort();
    let mut want: Vec<String> = (0..BLOBS).map(|i| format!("{} 1000000", topic_of(i))).collect();
    want.sort();
    assert_eq!(got, want, "node 3's retained store after its restart");
    // The link from node 1 to node 3 is up and stays up: a live publish on node 1 reaches node 3.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cluster.metric(1, "rampart_forward_link_up{peer=\"3\"}"), 1, "node 1's link to node 3");
    let live = reader.subscribe("devices/device-1/live", 1, 1, 20);
    wait_for_routes(&cluster, 1, 3, 1);
    let published = Command::new("mosquitto_pub")
        .args(publisher_args)
        .args(["-t", "devices/device-1/live", "-q", "1", "-m", "after the burst"])
        .output()
        .expect("mosquitto_pub");
    assert!(published.status.success());
    assert_eq!(lines(live), ["devices/device-1/live after the burst"]);
    let log = std::fs::read_to_string(&cluster.node(3).log)?;
    assert!(!log.contains("over the limit"), "node 3 refused an oversized frame");
    Ok(())
}

/// A running `mosquitto_sub` whose `topic payload` lines are collected as they arrive.
struct Collector {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Collector {
    fn start(mut child: Child) -> Collector {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Collector { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines()
    }
}

/// Waits until the collectors together hold `total` lines (then a little longer, so a duplicate
/// would show), and returns each one's lines.
fn collect(collectors: Vec<Collector>, total: usize) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while collectors.iter().map(|c| c.lines().len()).sum::<usize>() < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    collectors.into_iter().map(Collector::stop).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_group_spans_the_nodes_gets_each_message_once_and_prefers_local_members() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    const GROUP: &str = "$share/workers/devices/device-1/jobs/+";
    let member = |node: u64, client_id: &'static str| {
        let client = Client { cluster: &cluster, node, device: "device-1", client_id, version: "mqttv5" };
        Collector::start(client.subscribe(GROUP, 1, 1000, 60))
    };
    let (on_2, on_3) = (member(2, "device-1-worker-2"), member(3, "device-1-worker-3"));
    // A plain subscriber beside a member on node 3: it gets every message, the group once each.
    let watcher = Client { cluster: &cluster, node: 3, device: "device-1", client_id: "device-1-watcher", version: "mqttv5" };
    let watcher = Collector::start(watcher.subscribe("devices/device-1/jobs/+", 1, 1000, 60));
    wait_for_routes(&cluster, 1, 2, 1);
    wait_for_routes(&cluster, 1, 3, 2);
    publish_jobs(&cluster, 0..12);
    let got = collect(vec![on_2, on_3, watcher], 24);
    let (on_2, on_3, watcher) = (&got[0], &got[1], &got[2]);
    assert_eq!(watcher.len(), 12, "the plain subscriber gets every message: {watcher:?}");
    let mut group: Vec<&String> = on_2.iter().chain(on_3).collect();
    group.sort();
    let mut expected: Vec<&String> = watcher.iter().collect();
    expected.sort();
    assert_eq!(group, expected, "the group got each message exactly once (node 2: {on_2:?}, node 3: {on_3:?})");
    assert!(!on_2.is_empty() && !on_3.is_empty(), "both nodes' members got some (node 2: {on_2:?}, node 3: {on_3:?})");

    // With a member on the publishing node, it gets them all.
    let (on_1, on_2) = (member(1, "device-1-worker-1"), member(2, "device-1-worker-2"));
    eventually_local_member(&cluster);
    publish_jobs(&cluster, 12..18);
    let got = collect(vec![on_1, on_2], 6);
    assert_eq!(got[0].len(), 6, "the local member gets every message: {:?}", got[0]);
    assert!(got[1].is_empty(), "the remote member gets none: {:?}", got[1]);
    Ok(())
}

/// Publishes `devices/device-1/jobs/<n>` = `job <n>` at QoS 1 on node 1 for each `n`, one
/// `mosquitto_pub` each.
fn publish_jobs(cluster: &TestCluster, jobs: std::ops::Range<usize>) {
    for n in jobs {
        let client_id = format!("device-1-pub-{n}");
        let publisher = Client { cluster, node: 1, device: "device-1", client_id: &client_id, version: "mqttv5" };
        publisher.publish(&format!("devices/device-1/jobs/{n}"), 1, &format!("job {n}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_the_group_member_on_node_2_refuses_goes_to_the_member_on_node_3() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    const GROUP: &str = "$share/workers/devices/device-1/jobs/+";
    const JOBS: usize = 12;
    let (_, cert, key) = cluster.pki.devices.iter().find(|(n, _, _)| n == "device-1").expect("a development device");
    let (code, mut refuser) = mqtt_connect(cluster.node(2).ports.mtls, &cluster.pki.ca_cert, cert, key, "device-1-refuser").await?;
    assert_eq!(code, 0, "CONNACK");
    refuser.subscribe(GROUP).await?;
    let taker = Client { cluster: &cluster, node: 3, device: "device-1", client_id: "device-1-taker", version: "mqttv5" };
    let taker = Collector::start(taker.subscribe(GROUP, 1, JOBS, 60));
    wait_for_routes(&cluster, 1, 2, 1);
    wait_for_routes(&cluster, 1, 3, 1);
    publish_jobs(&cluster, 0..JOBS);
    let mut refused = 0;
    while let Some(packet) = refuser.next_packet(Duration::from_secs(3)).await? {
        if let Packet::Publish(publish) = packet {
            refuser.puback(publish.pkid, PubAckReason::UnspecifiedError).await?;
            refused += 1;
        }
    }
    assert!(refused > 0, "node 1 chose node 2 for some messages (round robin over the nodes with members)");
    let mut got = collect(vec![taker], JOBS).remove(0);
    got.sort();
    let mut expected: Vec<String> = (0..JOBS).map(|n| format!("devices/device-1/jobs/{n} job {n}")).collect();
    expected.sort();
    assert_eq!(got, expected, "the member on node 3 got every message once, the refused ones passed on by node 2");
    assert_eq!(cluster.metric(2, "rampart_shared_redispatched_total{reason=\"refused\"}"), refused);
    Ok(())
}

/// Waits until node 1 has a subscription (its group member: nothing else subscribes there), so
/// the next publish sees its local member.
fn eventually_local_member(cluster: &TestCluster) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.metric(1, "rampart_subscriptions") < 1 {
        assert!(Instant::now() < deadline, "the member on node 1 did not subscribe");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_will_published_on_node_1_reaches_a_subscriber_on_node_2() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let watcher = Client { cluster: &cluster, node: 2, device: "device-1", client_id: "device-1-watcher", version: "mqttv5" };
    let watcher = watcher.subscribe("devices/device-1/status", 1, 1, 20);
    wait_for_routes(&cluster, 1, 2, 1);
    let device = Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1", version: "mqttv5" };
    let will = ["--will-topic", "devices/device-1/status", "--will-payload", "offline", "--will-qos", "1"];
    let mut holder = Command::new("mosquitto_sub")
        .args(device.args())
        .args(will)
        .args(["-t", "devices/device-1/commands"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.metric(1, "rampart_connections") < 1 {
        assert!(Instant::now() < deadline, "the device did not connect to node 1");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Killed: its connection ends without DISCONNECT, so node 1 publishes the will.
    holder.kill().expect("kill the device's client");
    holder.wait().expect("the device's client ends");
    assert_eq!(lines(watcher), ["devices/device-1/status offline"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_ack_barrier_a_publish_right_after_suback_reaches_the_new_subscriber() -> anyhow::Result<()> {
    // Node 2's link to node 1 (its route announcements) goes through a relay that holds each
    // datagram for 400 ms: without the barrier, a publish on node 1 right after the SUBACK on
    // node 2 would find no route there yet. The barrier's bound is generous: a loaded machine
    // must not turn this into a timeout.
    let options = Options { quic_relay: Some(1), suback_barrier: "ack", suback_barrier_timeout_ms: 15_000, ..Options::default() };
    let cluster = TestCluster::start(options)?;
    cluster.wait_until_serving().await?;
    cluster.relay.as_ref().expect("relay").delay(Duration::from_millis(400));
    let subscriber = Client { cluster: &cluster, node: 2, device: "device-1", client_id: "device-1-sub", version: "mqttv5" };
    // Line-buffered, so its debug line about the SUBACK arrives when the SUBACK does.
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(subscriber.args())
        .args(["-d", "-t", "devices/device-1/fresh", "-q", "1", "-C", "1", "-W", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let subscribed_at = loop {
        let line = lines_rx.recv_timeout(Duration::from_secs(10)).expect("mosquitto_sub reports its SUBACK");
        if line.contains("received SUBACK") {
            break Instant::now();
        }
    };
    Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" }.publish(
        "devices/device-1/fresh",
        1,
        "right after",
    );
    let received = std::iter::from_fn(|| lines_rx.recv_timeout(Duration::from_secs(10)).ok()).any(|l| l == "right after");
    let _ = child.kill();
    let _ = child.wait();
    assert!(received, "the message published {:?} after the SUBACK reached the subscriber", subscribed_at.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_cluster_puback_policy_an_acknowledged_message_survives_the_publishing_node() -> anyhow::Result<()> {
    // Node 1's link to node 2 goes through a relay holding each datagram for 300 ms. With
    // `puback = "cluster"` the publisher's PUBACK waits until node 2 has queued the message, so
    // cutting the link and killing node 1 right after the PUBACK loses nothing.
    let options = Options { quic_relay: Some(2), puback: "cluster", ..Options::default() };
    let mut cluster = TestCluster::start(options)?;
    cluster.wait_until_serving().await?;
    let subscriber = Client { cluster: &cluster, node: 2, device: "device-1", client_id: "device-1-sub", version: "mqttv5" };
    let subscriber = subscriber.subscribe("devices/device-1/orders", 1, 1, 20);
    wait_for_routes(&cluster, 1, 2, 1);
    let relay = cluster.relay.as_ref().expect("relay");
    relay.delay(Duration::from_millis(300));
    let started = Instant::now();
    Client { cluster: &cluster, node: 1, device: "device-1", client_id: "device-1-pub", version: "mqttv5" }.publish(
        "devices/device-1/orders",
        1,
        "order 1",
    );
    let acknowledged_after = started.elapsed();
    relay.cut(true);
    cluster.kill(1);
    assert_eq!(lines(subscriber), ["devices/device-1/orders order 1"]);
    assert!(acknowledged_after >= Duration::from_millis(300), "the PUBACK waited for node 2: {acknowledged_after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn qos2_over_a_lossy_slow_link_arrives_exactly_once_in_order() -> anyhow::Result<()> {
    use std::io::Write;
    const MESSAGES: usize = 200;
    let options = Options { quic_relay: Some(2), ..Options::default() };
    let cluster = TestCluster::start(options)?;
    cluster.wait_until_serving().await?;
    let client = |node, client_id| Client { cluster: &cluster, node, device: "device-1", client_id, version: "mqttv5" };
    let subscriber = client(2, "device-1-sub").subscribe("devices/device-1/exact", 2, MESSAGES, 90);
    wait_for_routes(&cluster, 1, 2, 1);
    let relay = cluster.relay.as_ref().expect("relay");
    relay.lose(0.1);
    relay.delay(Duration::from_millis(20));
    let mut publisher = client(1, "device-1-pub").line_publisher("devices/device-1/exact", 2);
    let mut lines_in = publisher.stdin.take().expect("stdin");
    for n in 1..=MESSAGES {
        writeln!(lines_in, "{n}").expect("mosquitto_pub reads its input");
    }
    drop(lines_in);
    assert!(publisher.wait().expect("mosquitto_pub ends").success(), "mosquitto_pub");
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("devices/device-1/exact {n}")).collect();
    assert_eq!(lines(subscriber), expected, "every message once, in order, through 10 % loss each way");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_moving_under_a_stream_of_qos2_messages_gets_each_exactly_once() -> anyhow::Result<()> {
    use std::io::Write;
    const MESSAGES: usize = 400;
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let persistent = |node| persistent_subscription(&cluster, node, 2, "devices/device-1/stream");
    // The session subscribes on node 2 and goes offline there.
    let setup = Command::new("mosquitto_sub").args(persistent(2)).args(["-W", "1"]).output()?;
    assert!(setup.stdout.is_empty(), "{}", String::from_utf8_lossy(&setup.stderr));
    wait_for_routes(&cluster, 3, 2, 1);
    // Node 3 publishes a steady QoS 2 stream; a third of the way in, the client reconnects on
    // node 1, so its session moves from node 2 while messages keep coming.
    let mut publisher = Client { cluster: &cluster, node: 3, device: "device-1", client_id: "device-1-pub", version: "mqttv5" }
        .line_publisher("devices/device-1/stream", 2);
    let mut lines_in = publisher.stdin.take().expect("stdin");
    let mut subscriber = None;
    for n in 1..=MESSAGES {
        writeln!(lines_in, "{n}").expect("mosquitto_pub reads its input");
        lines_in.flush().expect("mosquitto_pub reads its input");
        if n == MESSAGES / 3 {
            let mut spawned = Command::new("mosquitto_sub");
            spawned.args(persistent(1)).args(["-C", &MESSAGES.to_string(), "-W", "60"]);
            subscriber = Some(spawned.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("mosquitto_sub"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(lines_in);
    assert!(publisher.wait().expect("mosquitto_pub ends").success(), "mosquitto_pub");
    let got = lines(subscriber.expect("the subscriber started"));
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for line in &got {
        *counts.entry(line.clone()).or_default() += 1;
    }
    let missing: Vec<usize> = (1..=MESSAGES).filter(|n| !counts.contains_key(&format!("devices/device-1/stream {n}"))).collect();
    let twice: Vec<&String> = counts.iter().filter(|(_, &c)| c > 1).map(|(l, _)| l).collect();
    let node_1 = std::fs::read_to_string(&cluster.node(1).log)?;
    assert!(missing.is_empty() && twice.is_empty(), "missing {missing:?}, delivered twice {twice:?}\nnode 1:\n{node_1}");
    assert_eq!(got.len(), MESSAGES);
    assert!(node_1.contains("session move completed"), "node 1 collected the tail:\n{node_1}");
    let node_2 = std::fs::read_to_string(&cluster.node(2).log)?;
    assert!(node_2.contains("session handed to another node"), "node 2 gave the session up:\n{node_2}");
    Ok(())
}
