//! Chaos: a QoS 2 and a QoS 1 stream with persistent subscribers — an APPLICATION session that
//! moves from node to node, and a DEVICE session that stays on node 1 — while the harness kills
//! (`-9`) and restarts nodes 2 and 3 and cuts and heals the links to node 3. At the end every
//! message whose publisher got its acknowledgement has been delivered (QoS 2 exactly once, and
//! no QoS 2 message twice at all), and the counts are printed.
//!
//! What `puback = "cluster"` promises, and so what is checked (see docs/cluster.md): an
//! acknowledged message is held by every node with a live link it went to — queued for the
//! subscribers there, on disk for offline APPLICATION sessions — or, for a node whose link is
//! down, in the publishing node's replay buffer until the link is back. So the faults keep to
//! that promise: the APPLICATION client is never connected to a node that is killed (an online
//! session is not on disk anywhere), the DEVICE session lives on node 1, which is never killed
//! (DEVICE sessions are memory only), no node is killed while a link is cut, and no fault comes
//! before the session's last move has settled (the old node dropped its copy: a node killed or
//! cut off while a move is unsettled gives the session back, and what the new node delivered
//! meanwhile comes again — at least once, see docs/cluster.md). Publishers never re-send a
//! message they got no acknowledgement for (at most once for those).
//!
//! `RAMPART_CHAOS_SECONDS` (default 60) sets how long the faults go on.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttbytes::{v5, QoS};
use rampart_cluster_tests::{mqtt_connect_with, MqttClient, Options, TestCluster};
use rampart_node::mqtt::codec::Packet;

/// Time between two publishes of one publisher.
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// How long a publisher stays connected to one node.
const STAY_ON_A_NODE: Duration = Duration::from_secs(2);
/// How long a publisher waits for an acknowledgement before it gives the connection up.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Where the clients connect, without borrowing the cluster the faults change.
#[derive(Clone)]
struct Endpoints {
    ports: Vec<u16>,
    ca: PathBuf,
    devices: HashMap<String, (PathBuf, PathBuf)>,
}

impl Endpoints {
    async fn connect(&self, node: u64, device: &str, client_id: &str, clean_start: bool) -> anyhow::Result<(v5::ConnAck, MqttClient)> {
        let (cert, key) = &self.devices[device];
        let mut connect = v5::Connect::new(client_id);
        connect.keep_alive = 0;
        connect.clean_session = clean_start;
        connect.properties = Some(v5::ConnectProperties {
            session_expiry_interval: Some(if clean_start { 0 } else { 3600 }),
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        });
        let port = self.ports[node as usize - 1];
        tokio::time::timeout(Duration::from_secs(10), mqtt_connect_with(port, &self.ca, cert, key, connect)).await?
    }
}

/// One stream: a device publishes to its own topic and a persistent session of the same device
/// subscribes to it.
#[derive(Debug, Clone, Copy)]
struct Stream {
    device: &'static str,
    qos: QoS,
}

impl Stream {
    fn topic(&self) -> String {
        format!("devices/{}/chaos", self.device)
    }
}

/// What a publisher sent, and which messages (by sequence number) it got acknowledged.
#[derive(Debug, Default)]
struct Published {
    sent: u64,
    acknowledged: Vec<u64>,
}

/// Publishes sequence numbers until `stop`, on each node in turn for [`STAY_ON_A_NODE`] (and on
/// the next one as soon as a connection fails); a message without an acknowledgement is not
/// sent again.
async fn publish(endpoints: Endpoints, stream: Stream, stop: Arc<AtomicBool>, progress: Arc<AtomicU64>) -> Published {
    let mut published = Published::default();
    let (mut node, mut sequence) = (0u64, 0u64);
    let client_id = format!("{}-publisher", stream.device);
    while !stop.load(Ordering::Relaxed) {
        node = node % endpoints.ports.len() as u64 + 1;
        let mut client = match endpoints.connect(node, stream.device, &client_id, true).await {
            Ok((connack, client)) if connack.code == v5::ConnectReturnCode::Success => client,
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (mut pkid, connected) = (0u16, Instant::now());
        while !stop.load(Ordering::Relaxed) && connected.elapsed() < STAY_ON_A_NODE {
            sequence += 1;
            progress.store(sequence, Ordering::Relaxed);
            pkid = pkid % 60_000 + 1;
            let mut message = v5::Publish::new(stream.topic(), stream.qos, sequence.to_string());
            message.pkid = pkid;
            published.sent += 1;
            match acknowledge(&mut client, message).await {
                Ok(true) => published.acknowledged.push(sequence),
                Ok(false) => {}
                Err(_) => break,
            }
            tokio::time::sleep(PUBLISH_EVERY).await;
        }
        let _ = client.send(&Packet::Disconnect(v5::Disconnect::new())).await;
    }
    published
}

/// Sends `message` and completes its acknowledgement: whether the broker accepted it (PUBACK,
/// or PUBREC then PUBREL/PUBCOMP, with a success code). A QoS 2 message counts as acknowledged
/// with its PUBREC: from then on the broker owns it.
async fn acknowledge(client: &mut MqttClient, message: v5::Publish) -> anyhow::Result<bool> {
    let (qos, pkid) = (message.qos, message.pkid);
    client.send(&Packet::Publish(message)).await?;
    let mut next = async || client.next_packet(ACK_WAIT).await?.ok_or_else(|| anyhow::anyhow!("no acknowledgement"));
    match (qos, next().await?) {
        (QoS::AtLeastOnce, Packet::PubAck(ack)) if ack.pkid == pkid => Ok((ack.reason as u8) < 0x80),
        (QoS::ExactlyOnce, Packet::PubRec(rec)) if rec.pkid == pkid => {
            let accepted = (rec.reason as u8) < 0x80;
            if accepted {
                client.send(&Packet::PubRel(v5::PubRel::new(pkid))).await?;
                match client.next_packet(ACK_WAIT).await? {
                    Some(Packet::PubComp(comp)) if comp.pkid == pkid => {}
                    other => anyhow::bail!("expected PUBCOMP {pkid}, got {other:?}"),
                }
            }
            Ok(accepted)
        }
        (_, other) => anyhow::bail!("expected the acknowledgement of {pkid}, got {other:?}"),
    }
}

/// What a subscriber received: how often each sequence number arrived, and (its QoS 2 state,
/// kept across connections like any client's session state) the packet ids awaiting PUBREL.
#[derive(Debug, Default)]
struct Received {
    counts: HashMap<u64, u32>,
    awaiting_pubrel: HashSet<u16>,
}

impl Received {
    fn has_all(&self, sequences: &[u64]) -> bool {
        sequences.iter().all(|s| self.counts.contains_key(s))
    }
}

/// Connects the stream's persistent session on `node` (session expiry one hour), subscribes and
/// acknowledges what arrives until `enough` or `duration`, then disconnects normally (the session
/// stays, offline).
async fn receive(
    endpoints: &Endpoints,
    stream: Stream,
    node: u64,
    received: &mut Received,
    duration: Duration,
    enough: impl Fn(&Received) -> bool,
) -> anyhow::Result<()> {
    let client_id = format!("{}-subscriber", stream.device);
    let (connack, mut client) = endpoints.connect(node, stream.device, &client_id, false).await?;
    anyhow::ensure!(connack.code == v5::ConnectReturnCode::Success, "node {node} refused the subscriber: {connack:?}");
    let mut early = Vec::new();
    client.subscribe_keeping(&stream.topic(), stream.qos, &mut early).await?;
    for packet in early {
        handle(&mut client, packet, received).await?;
    }
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && !enough(received) {
        if let Some(packet) = client.next_packet(Duration::from_millis(200)).await? {
            handle(&mut client, packet, received).await?;
        }
    }
    // Offline once the broker closes the connection (and, for an APPLICATION session, on disk);
    // what it sent before it read the DISCONNECT stays in flight in the session.
    client.send(&Packet::Disconnect(v5::Disconnect::new())).await?;
    loop {
        match client.next_packet(Duration::from_secs(30)).await {
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("node {node} did not close the connection of {client_id} within 30 s after its DISCONNECT"),
            Err(_) => return Ok(()),
        }
    }
}

async fn handle(client: &mut MqttClient, packet: Packet, received: &mut Received) -> anyhow::Result<()> {
    match packet {
        Packet::Publish(message) => {
            let sequence: u64 = std::str::from_utf8(&message.payload)?.parse()?;
            let new = match message.qos {
                QoS::AtMostOnce => true,
                QoS::AtLeastOnce => {
                    client.send(&Packet::PubAck(v5::PubAck::new(message.pkid))).await?;
                    true
                }
                // A PUBLISH again before its PUBREL is the same message, not a second one.
                QoS::ExactlyOnce => {
                    let new = received.awaiting_pubrel.insert(message.pkid);
                    client.send(&Packet::PubRec(v5::PubRec::new(message.pkid))).await?;
                    new
                }
            };
            if new {
                *received.counts.entry(sequence).or_default() += 1;
            }
        }
        Packet::PubRel(release) => {
            received.awaiting_pubrel.remove(&release.pkid);
            client.send(&Packet::PubComp(v5::PubComp::new(release.pkid))).await?;
        }
        Packet::Disconnect(disconnect) => anyhow::bail!("the broker disconnected the subscriber: {disconnect:?}"),
        _ => {}
    }
    Ok(())
}

/// Moves out of `node` it has settled so far (the new node holds the session; the copy there is
/// dropped).
fn settled_moves(cluster: &TestCluster, node: u64) -> usize {
    std::fs::read_to_string(&cluster.node(node).log).map_or(0, |log| log.matches("moved session settled").count())
}

fn device_is_an_application(cluster: &TestCluster, device: &str) {
    let allow = "readwrite:devices/%u/#";
    let args = ["--wait", "credential", "put", "--name", device, "--identity", device, "--client-type", "application", "--allow", allow];
    let put = cluster.cli(1, &args);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_messages_survive_killed_nodes_cut_links_and_moving_sessions() -> anyhow::Result<()> {
    let seconds = std::env::var("RAMPART_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let options = Options { quic_relay: Some(3), puback: "cluster", link_idle_timeout_ms: 2000, ..Options::default() };
    let mut cluster = TestCluster::start(options)?;
    let outcome = chaos(&mut cluster, Duration::from_secs(seconds)).await;
    if let Ok(dir) = std::env::var("RAMPART_CHAOS_LOGS") {
        for node in &cluster.nodes {
            let _ = std::fs::copy(&node.log, std::path::Path::new(&dir).join(format!("node-{}.log", node.id)));
        }
    }
    outcome
}

async fn chaos(cluster: &mut TestCluster, duration: Duration) -> anyhow::Result<()> {
    cluster.wait_until_serving().await?;
    device_is_an_application(cluster, "device-1");
    let endpoints = Endpoints {
        ports: cluster.nodes.iter().map(|n| n.ports.mtls).collect(),
        ca: cluster.pki.ca_cert.clone(),
        devices: cluster.pki.devices.iter().map(|(name, cert, key)| (name.clone(), (cert.clone(), key.clone()))).collect(),
    };
    let application = Stream { device: "device-1", qos: QoS::ExactlyOnce };
    let device = Stream { device: "device-2", qos: QoS::AtLeastOnce };
    let mut application_received = Received::default();
    // Both sessions exist before anything is published.
    receive(&endpoints, application, 2, &mut application_received, Duration::ZERO, |_| false).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let device_subscriber = {
        let (endpoints, stop) = (endpoints.clone(), stop.clone());
        tokio::spawn(async move {
            let mut received = Received::default();
            while !stop.load(Ordering::Relaxed) {
                let until_stopped = |_: &Received| stop.load(Ordering::Relaxed);
                if let Err(e) = receive(&endpoints, device, 1, &mut received, Duration::from_secs(3600), until_stopped).await {
                    eprintln!("device subscriber: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            received
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let progress = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let publishers: Vec<_> = [application, device]
        .into_iter()
        .zip(&progress)
        .map(|(stream, progress)| tokio::spawn(publish(endpoints.clone(), stream, stop.clone(), progress.clone())))
        .collect();

    let started = Instant::now();
    let (mut round, mut previous) = (0u64, 2);
    let mut faults = Vec::new();
    while started.elapsed() < duration {
        round += 1;
        // The APPLICATION session moves to the next node, takes what is there, and goes offline.
        let node = [2, 3, 1][(round % 3) as usize];
        let at = progress.each_ref().map(|p| p.load(Ordering::Relaxed));
        let settled = settled_moves(cluster, previous);
        receive(&endpoints, application, node, &mut application_received, Duration::from_secs(2), |_| false).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while settled_moves(cluster, previous) <= settled {
            anyhow::ensure!(
                Instant::now() < deadline,
                "round {round}: the move from node {previous} to node {node} did not settle within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        previous = node;
        let fault = match round % 3 {
            0 => {
                cluster.kill(2);
                tokio::time::sleep(Duration::from_secs(1)).await;
                cluster.start_node(2)?;
                "kill -9 node 2"
            }
            1 => {
                let relay = cluster.relay.as_ref().expect("a relay in front of node 3");
                relay.cut(true);
                tokio::time::sleep(Duration::from_secs(3)).await;
                relay.cut(false);
                "cut node 3's links"
            }
            _ => {
                cluster.kill(3);
                tokio::time::sleep(Duration::from_secs(1)).await;
                cluster.start_node(3)?;
                "kill -9 node 3"
            }
        };
        faults.push(format!("round {round} (from QoS 2 #{}, QoS 1 #{}): session on node {node}, then {fault}", at[0], at[1]));
        cluster.wait_until_serving().await?;
        // Replay buffers drain before the next fault.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut published = Vec::new();
    for publisher in publishers {
        published.push(publisher.await?);
    }
    let device_received_live = device_subscriber.await?;
    let (application_published, device_published) = (&published[0], &published[1]);

    // The last pieces: each subscriber takes what is still queued for it.
    let wanted = application_published.acknowledged.clone();
    receive(&endpoints, application, 1, &mut application_received, Duration::from_secs(60), |r| r.has_all(&wanted)).await?;
    let mut device_received = device_received_live;
    let wanted = device_published.acknowledged.clone();
    receive(&endpoints, device, 1, &mut device_received, Duration::from_secs(30), |r| r.has_all(&wanted)).await?;

    let report = |name: &str, published: &Published, received: &Received| {
        let missing: Vec<u64> = published.acknowledged.iter().copied().filter(|s| !received.counts.contains_key(s)).collect();
        let twice: Vec<u64> = received.counts.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).collect();
        eprintln!(
            "{name}: sent {}, acknowledged {}, received {} distinct, {} more than once; acknowledged but missing: {}",
            published.sent,
            published.acknowledged.len(),
            received.counts.len(),
            twice.len(),
            missing.len()
        );
        (missing, twice)
    };
    eprintln!("{} rounds in {:?}:\n  {}", round, started.elapsed(), faults.join("\n  "));
    let (missing, twice) = report("QoS 2, APPLICATION session moving", application_published, &application_received);
    assert!(missing.is_empty(), "acknowledged QoS 2 messages lost: {missing:?}");
    assert!(twice.is_empty(), "QoS 2 messages delivered more than once: {twice:?}");
    let (missing, _) = report("QoS 1, DEVICE session on node 1", device_published, &device_received);
    assert!(missing.is_empty(), "acknowledged QoS 1 messages lost: {missing:?}");
    assert!(application_published.acknowledged.len() > 100 && device_published.acknowledged.len() > 100, "the streams ran");
    Ok(())
}
