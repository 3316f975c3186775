//! `loadgen`: a load generator for any MQTT 3.1.1 broker. Scenarios: fan-in (P publishers → one
//! wildcard subscriber), fan-out (one publisher → S subscribers) and connect storm; QoS 0 or 1;
//! TCP, TLS or mutual TLS. Reports delivered messages per second, loss, one-way latency
//! percentiles from timestamps in the payload, connects per second and the broker's RSS.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use mqttbytes::v4::{self, Packet};
use mqttbytes::QoS;
use rampart_benches::stats::{self, Percentiles};
use rampart_benches::transport::{self, Connector, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{watch, Barrier, Semaphore};

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator for MQTT brokers")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Port the subscribers connect to (another node of a cluster); default: `--port`.
    #[arg(long)]
    subscriber_port: Option<u16>,
    /// Pause between the subscriptions and the first publish, in milliseconds (lets a cluster
    /// announce the new routes).
    #[arg(long, default_value_t = 0)]
    settle_ms: u64,
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// PEM CA that signed the broker's certificate (tls, mtls).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Directory of client certificates NAME.pem + NAME.key (mtls), used round robin.
    #[arg(long)]
    cert_dir: Option<std::path::PathBuf>,
    /// TLS server name to verify.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long, value_enum, default_value_t = Scenario::FanIn)]
    scenario: Scenario,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    #[arg(long, default_value_t = 8)]
    subscribers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Total target rate in messages per second over all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..))]
    payload_size: u64,
    /// Unacknowledged QoS 1 messages per publisher.
    #[arg(long, default_value_t = 100)]
    inflight: usize,
    /// Connections to open (connect-storm).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections opened concurrently (connect-storm).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Loopback source addresses the connect-storm's connections come from, 127.0.0.1 up to
    /// 127.0.0.N in turn (one address has about 28 000 ephemeral ports); 0: the system picks.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=254))]
    source_ips: u16,
    /// The whole run is abandoned after this long.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Broker process id, to report its resident memory.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Fan-in with the subscriber offline: it leaves a persistent session (clean session 0)
    /// before the publishers start and reconnects to drain its queue once every message is
    /// acknowledged. The rate reported is acknowledged publishes per second: what queueing for
    /// an offline (durable) session costs the publishers.
    #[arg(long)]
    offline_subscriber: bool,
    /// Each publisher writes every PUBLISH on its own (one TLS record per message, as a device
    /// sends) instead of batching up to 32 KiB per write.
    #[arg(long)]
    publish_each: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Tls,
    Mtls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    FanIn,
    FanOut,
    ConnectStorm,
    /// `--messages` times: subscribe to a fresh topic (through `--subscriber-port`), then
    /// publish to it (through `--port`) every millisecond until the subscriber receives it.
    /// Reports the time from SUBACK to the first delivery: how soon a new subscription is
    /// routable from another node.
    RouteLatency,
}

/// What one run measured.
#[derive(Debug, Default)]
struct Report {
    sent: u64,
    acked: u64,
    received: u64,
    expected: u64,
    msgs_per_sec: f64,
    latency_us: Percentiles,
    connects_per_sec: f64,
    failures: u64,
    rss_before_kib: Option<u64>,
    rss_after_kib: Option<u64>,
}

/// Packets larger than this from the broker are a protocol error for the load generator.
const MAX_PACKET: usize = 16 * 1024 * 1024;
/// Quiet time after the last publish before missing messages count as lost.
const DRAIN: Duration = Duration::from_secs(3);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(args.timeout_secs), run(&args))
            .await
            .with_context(|| format!("run did not finish within {} s", args.timeout_secs))?
    })?;
    print(&args, &report);
    if report.received < report.expected || report.failures > 0 {
        std::process::exit(3);
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let connectors = connectors_to(args, args.port)?;
    let rss_before = args.broker_pid.and_then(rss_kib);
    let mut report = match args.scenario {
        Scenario::ConnectStorm => connect_storm(args, &connectors).await?,
        Scenario::FanIn | Scenario::FanOut | Scenario::RouteLatency => {
            let subscriber_connectors = match args.subscriber_port {
                Some(port) => connectors_to(args, port)?,
                None => connectors.clone(),
            };
            match args.scenario {
                Scenario::RouteLatency => route_latency(args, &subscriber_connectors, &connectors).await?,
                _ => messaging(args, &subscriber_connectors, &connectors).await?,
            }
        }
    };
    report.rss_before_kib = rss_before;
    report.rss_after_kib = report.rss_after_kib.or_else(|| args.broker_pid.and_then(rss_kib));
    Ok(report)
}

/// One connector per client identity (a single one unless mTLS), to `port`.
fn connectors_to(args: &Args, port: u16) -> anyhow::Result<Vec<Connector>> {
    let addr = format!("{}:{}", args.host, port);
    let ca = || args.ca.as_deref().context("--ca is required for tls and mtls");
    Ok(match args.transport {
        Transport::Tcp => vec![Connector::tcp(addr)],
        Transport::Tls => vec![Connector::tls(addr, ca()?, &args.server_name, None)?],
        Transport::Mtls => {
            let dir = args.cert_dir.as_deref().context("--cert-dir is required for mtls")?;
            transport::identities(dir)?
                .iter()
                .map(|id| Connector::tls(addr.clone(), ca()?, &args.server_name, Some(id)))
                .collect::<anyhow::Result<_>>()?
        }
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// An MQTT 3.1.1 connection split for concurrent reading and writing.
struct Conn {
    reader: ReadHalf<Box<dyn Stream>>,
    writer: WriteHalf<Box<dyn Stream>>,
    input: BytesMut,
}

impl Conn {
    async fn open(connector: &Connector, client_id: &str) -> anyhow::Result<Conn> {
        Conn::open_session(connector, client_id, true).await
    }

    /// Connects with clean session `clean` (false: a persistent session).
    async fn open_session(connector: &Connector, client_id: &str, clean: bool) -> anyhow::Result<Conn> {
        Conn::open_from(connector, client_id, clean, None).await
    }

    /// As [`Conn::open_session`], from the source address `source`.
    async fn open_from(connector: &Connector, client_id: &str, clean: bool, source: Option<IpAddr>) -> anyhow::Result<Conn> {
        let (reader, writer) = tokio::io::split(connector.connect_from(source).await?);
        let mut conn = Conn { reader, writer, input: BytesMut::with_capacity(64 * 1024) };
        let mut connect = v4::Connect::new(client_id);
        connect.keep_alive = 120;
        connect.clean_session = clean;
        conn.send(|out| connect.write(out)).await?;
        match conn.next().await? {
            Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => Ok(conn),
            Packet::ConnAck(ack) => bail!("broker refused {client_id}: {:?}", ack.code),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, encode: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        encode(&mut out).map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
        self.writer.write_all(&out).await?;
        Ok(())
    }

    /// The next packet, reading as needed.
    async fn next(&mut self) -> anyhow::Result<Packet> {
        loop {
            match v4::read(&mut self.input, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {
                    if self.reader.read_buf(&mut self.input).await? == 0 {
                        bail!("broker closed the connection");
                    }
                }
                Err(e) => bail!("bad packet from broker: {e:?}"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let mut subscribe = v4::Subscribe::new(filter, qos);
        subscribe.pkid = 1;
        self.send(|out| subscribe.write(out)).await?;
        loop {
            match self.next().await? {
                Packet::SubAck(ack) if ack.return_codes.iter().all(|c| *c != v4::SubscribeReasonCode::Failure) => return Ok(()),
                // A late message of an earlier subscription.
                Packet::Publish(_) => {}
                other => bail!("subscription to {filter} refused: {other:?}"),
            }
        }
    }
}

fn qos_of(args: &Args) -> QoS {
    if args.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    }
}

/// See [`Scenario::RouteLatency`].
async fn route_latency(args: &Args, subscriber_connectors: &[Connector], connectors: &[Connector]) -> anyhow::Result<Report> {
    let run_id = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros());
    let mut subscriber = Conn::open(&subscriber_connectors[0], &format!("lg-{run_id}-sub")).await?;
    let Conn { writer: mut publisher, .. } = Conn::open(&connectors[0], &format!("lg-{run_id}-pub")).await?;
    let mut report = Report { expected: args.messages, ..Report::default() };
    let mut samples = Vec::with_capacity(args.messages as usize);
    for n in 0..args.messages {
        let topic = format!("bench/{run_id}/route/{n}");
        subscriber.subscribe(&topic, QoS::AtMostOnce).await?;
        let subscribed = Instant::now();
        let mut out = BytesMut::new();
        v4::Publish::new(topic.as_str(), QoS::AtMostOnce, vec![0u8; 8]).write(&mut out).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let received = loop {
            tokio::select! {
                _ = tick.tick() => {
                    publisher.write_all(&out).await?;
                    report.sent += 1;
                }
                packet = subscriber.next() => if let Packet::Publish(_) = packet? { break Instant::now() },
            }
        };
        samples.push(received.duration_since(subscribed).as_micros() as u64);
        report.received += 1;
        // Leave the subscription, and drain what was still in flight for it.
        let mut unsubscribe = v4::Unsubscribe::new(topic.as_str());
        unsubscribe.pkid = 2;
        subscriber.send(|out| unsubscribe.write(out)).await?;
        while !matches!(subscriber.next().await?, Packet::UnsubAck(_)) {}
    }
    report.latency_us = stats::percentiles(&mut samples);
    Ok(report)
}

/// Subscribers connect through `subscriber_connectors`, publishers through `connectors`.
async fn messaging(args: &Args, subscriber_connectors: &[Connector], connectors: &[Connector]) -> anyhow::Result<Report> {
    let qos = qos_of(args);
    let run_id = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros());
    let (publishers, subscribers) = match args.scenario {
        Scenario::FanIn => (args.publishers, 1),
        _ => (1, args.subscribers),
    };
    let per_subscriber = match args.scenario {
        Scenario::FanIn => args.messages * publishers as u64,
        _ => args.messages,
    };
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let mut subs = Vec::new();
    let offline = args.offline_subscriber && args.scenario == Scenario::FanIn;
    let subscriber_id = |i: usize| format!("lg-{run_id}-sub-{i}");
    for i in 0..subscribers {
        let mut conn = Conn::open_session(&subscriber_connectors[i % subscriber_connectors.len()], &subscriber_id(i), !offline).await?;
        let filter = match args.scenario {
            Scenario::FanIn => format!("bench/{run_id}/+/data"),
            _ => format!("bench/{run_id}/fanout"),
        };
        conn.subscribe(&filter, qos).await?;
        if offline {
            conn.writer.write_all(&[0xE0, 0x00]).await?;
            while conn.reader.read_buf(&mut conn.input).await? > 0 {}
        } else {
            subs.push(tokio::spawn(subscribe_loop(conn, per_subscriber, base, received.clone(), stop_rx.clone())));
        }
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let start = Arc::new(Barrier::new(publishers));
    let rate = args.rate as f64 / publishers as f64;
    let mut pubs = Vec::new();
    for i in 0..publishers {
        let conn = Conn::open(&connectors[(subscribers + i) % connectors.len()], &format!("lg-{run_id}-pub-{i}")).await?;
        let topic = match args.scenario {
            Scenario::FanIn => format!("bench/{run_id}/{i}/data"),
            _ => format!("bench/{run_id}/fanout"),
        };
        let job = PublishJob {
            topic,
            qos,
            messages: args.messages,
            rate,
            payload_size: args.payload_size as usize,
            inflight: args.inflight,
            each: args.publish_each,
        };
        pubs.push(tokio::spawn(publish_loop(conn, job, base, start.clone())));
    }
    let mut report = Report { expected: per_subscriber * subscribers as u64, ..Report::default() };
    let publishing = Instant::now();
    for p in pubs {
        let (sent, acked) = p.await??;
        report.sent += sent;
        report.acked += acked;
    }
    let acknowledged_per_sec = report.acked as f64 / publishing.elapsed().as_secs_f64().max(1e-6);
    if offline {
        for i in 0..subscribers {
            let conn = Conn::open_session(&subscriber_connectors[i % subscriber_connectors.len()], &subscriber_id(i), false).await?;
            subs.push(tokio::spawn(subscribe_loop(conn, per_subscriber, base, received.clone(), stop_rx.clone())));
        }
    }
    let mut last = received.load(Ordering::Relaxed);
    while last < report.expected {
        tokio::time::sleep(DRAIN).await;
        let now = received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let _ = stop.send(true);
    let mut samples = Vec::new();
    let (mut first, mut end) = (None::<Instant>, None::<Instant>);
    for s in subs {
        let result = s.await??;
        report.received += result.received;
        samples.extend(result.samples);
        first = first.into_iter().chain(result.first).min();
        end = end.into_iter().chain(result.last).max();
    }
    if offline {
        report.msgs_per_sec = acknowledged_per_sec;
    } else if let (Some(first), Some(end)) = (first, end) {
        report.msgs_per_sec = report.received as f64 / end.duration_since(first).as_secs_f64().max(1e-6);
    }
    report.latency_us = stats::percentiles(&mut samples);
    Ok(report)
}

struct SubscriberResult {
    received: u64,
    samples: Vec<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

async fn subscribe_loop(
    mut conn: Conn,
    expected: u64,
    base: Instant,
    progress: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SubscriberResult> {
    let mut result = SubscriberResult { received: 0, samples: Vec::with_capacity(expected as usize), first: None, last: None };
    let mut acks = BytesMut::new();
    while result.received < expected {
        loop {
            match v4::read(&mut conn.input, MAX_PACKET) {
                Ok(Packet::Publish(p)) => {
                    let now = Instant::now();
                    result.first.get_or_insert(now);
                    result.last = Some(now);
                    result.received += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                    if let Some(l) = stats::latency(&p.payload, base) {
                        result.samples.push(l.as_micros() as u64);
                    }
                    if p.qos == QoS::AtLeastOnce {
                        v4::PubAck::new(p.pkid).write(&mut acks).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    }
                }
                Ok(_) => {}
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => bail!("bad packet from broker: {e:?}"),
            }
        }
        if !acks.is_empty() {
            conn.writer.write_all(&acks).await?;
            acks.clear();
        }
        if result.received >= expected {
            break;
        }
        tokio::select! {
            read = conn.reader.read_buf(&mut conn.input) => if read? == 0 { bail!("broker closed a subscriber connection") },
            _ = stop.changed() => break,
        }
    }
    let _ = conn.writer.write_all(&[0xE0, 0x00]).await;
    Ok(result)
}

struct PublishJob {
    topic: String,
    qos: QoS,
    messages: u64,
    /// Messages per second for this publisher; 0 = unlimited.
    rate: f64,
    payload_size: usize,
    inflight: usize,
    /// One write per PUBLISH.
    each: bool,
}

/// Publishes `job.messages` messages, paced by `job.rate`, keeping at most `job.inflight`
/// unacknowledged at QoS 1. Returns (sent, acknowledged).
async fn publish_loop(conn: Conn, job: PublishJob, base: Instant, start: Arc<Barrier>) -> anyhow::Result<(u64, u64)> {
    let Conn { mut reader, mut writer, mut input } = conn;
    let window = Arc::new(Semaphore::new(job.inflight.max(1)));
    let acked = Arc::new(AtomicU64::new(0));
    let ack_reader = {
        let (window, acked) = (window.clone(), acked.clone());
        let expected = if job.qos == QoS::AtLeastOnce { job.messages } else { 0 };
        tokio::spawn(async move {
            while acked.load(Ordering::Relaxed) < expected {
                loop {
                    match v4::read(&mut input, MAX_PACKET) {
                        Ok(Packet::PubAck(_)) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                            window.add_permits(1);
                        }
                        Ok(_) => {}
                        Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => bail!("bad packet from broker: {e:?}"),
                    }
                }
                if acked.load(Ordering::Relaxed) >= expected {
                    break;
                }
                if reader.read_buf(&mut input).await? == 0 {
                    bail!("broker closed a publisher connection");
                }
            }
            Ok(())
        })
    };
    start.wait().await;
    let began = Instant::now();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut payload = vec![0u8; job.payload_size];
    let mut sent = 0u64;
    while sent < job.messages {
        if job.rate > 0.0 {
            let due = began + Duration::from_secs_f64(sent as f64 / job.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        if job.qos == QoS::AtLeastOnce {
            window.acquire().await?.forget();
        }
        stats::stamp(&mut payload, base);
        let mut publish = v4::Publish::from_bytes(job.topic.as_str(), job.qos, Bytes::copy_from_slice(&payload));
        publish.pkid = if job.qos == QoS::AtLeastOnce { (sent % 65_535) as u16 + 1 } else { 0 };
        publish.write(&mut out).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        sent += 1;
        let batch_full = out.len() >= 32 * 1024 || sent == job.messages;
        let window_empty = job.qos == QoS::AtLeastOnce && window.available_permits() == 0;
        if batch_full || window_empty || job.rate > 0.0 || job.each {
            writer.write_all(&out).await?;
            out.clear();
        }
    }
    ack_reader.await??;
    writer.write_all(&[0xE0, 0x00]).await?;
    Ok((sent, acked.load(Ordering::Relaxed)))
}

async fn connect_storm(args: &Args, connectors: &[Connector]) -> anyhow::Result<Report> {
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let run_id = std::process::id();
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let connector = connectors[i % connectors.len()].clone();
        let source = (args.source_ips > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(args.source_ips)) as u8)));
        let permit = slots.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let conn = Conn::open_from(&connector, &format!("lg-{run_id}-storm-{i}"), true, source).await;
            drop(permit);
            // A held connection only waits: it keeps no read buffer.
            conn.map(|conn| Conn { input: BytesMut::new(), ..conn })
        }));
    }
    let mut open = Vec::with_capacity(args.connections);
    let mut report = Report::default();
    for t in tasks {
        match t.await? {
            Ok(conn) => open.push(conn),
            Err(e) => {
                if report.failures == 0 {
                    eprintln!("loadgen: connect failed: {e:#}");
                }
                report.failures += 1;
            }
        }
    }
    report.connects_per_sec = open.len() as f64 / began.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rss_after_kib = args.broker_pid.and_then(rss_kib);
    // While they are all held: the latency of messages to one more subscriber, 500 at 500/s.
    let probe = Args { scenario: Scenario::FanIn, qos: 0, publishers: 1, subscribers: 1, messages: 500, rate: 500, ..args.clone() };
    let probed = messaging(&probe, connectors, connectors).await?;
    (report.latency_us, report.expected, report.received) = (probed.latency_us, probed.expected, probed.received);
    for mut conn in open {
        let _ = conn.writer.write_all(&[0xE0, 0x00]).await;
    }
    Ok(report)
}

fn print(args: &Args, r: &Report) {
    let connections = args.connections as f64;
    let per_conn = match (args.scenario, r.rss_before_kib, r.rss_after_kib) {
        (Scenario::ConnectStorm, Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / connections),
        _ => None,
    };
    if args.json {
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        println!(
            "{{\"scenario\":\"{:?}\",\"transport\":\"{:?}\",\"qos\":{},\"sent\":{},\"acked\":{},\"received\":{},\"expected\":{},\"lost\":{},\"msgs_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"connects_per_sec\":{:.1},\"failures\":{},\"rss_before_kib\":{},\"rss_after_kib\":{},\"rss_per_connection_kib\":{}}}",
            args.scenario,
            args.transport,
            args.qos,
            r.sent,
            r.acked,
            r.received,
            r.expected,
            r.expected.saturating_sub(r.received),
            r.msgs_per_sec,
            r.latency_us.p50,
            r.latency_us.p99,
            r.latency_us.max,
            r.connects_per_sec,
            r.failures,
            opt(r.rss_before_kib),
            opt(r.rss_after_kib),
            per_conn.map_or("null".to_string(), |v| format!("{v:.1}")),
        );
        return;
    }
    println!("scenario {:?} over {:?}, QoS {}", args.scenario, args.transport, args.qos);
    if args.scenario == Scenario::ConnectStorm {
        println!("  connects/s {:.1}   failures {}", r.connects_per_sec, r.failures);
        if let Some(kib) = per_conn {
            println!("  broker RSS {:?} -> {:?} KiB ({kib:.1} KiB per connection)", r.rss_before_kib, r.rss_after_kib);
        }
        return;
    }
    println!(
        "  sent {}  acked {}  received {} of {} (lost {})",
        r.sent,
        r.acked,
        r.received,
        r.expected,
        r.expected.saturating_sub(r.received)
    );
    println!("  throughput {:.0} msg/s delivered", r.msgs_per_sec);
    println!("  latency p50 {} us  p99 {} us  max {} us", r.latency_us.p50, r.latency_us.p99, r.latency_us.max);
    if let (Some(b), Some(a)) = (r.rss_before_kib, r.rss_after_kib) {
        println!("  broker RSS {b} -> {a} KiB");
    }
}
