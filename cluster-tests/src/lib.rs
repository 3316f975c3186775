//! Harness for cluster tests and benchmarks: a generated PKI, one config per node with free
//! loopback ports, `rampart serve` processes that can be stopped, killed (`SIGKILL`) and
//! restarted, admin API clients, and a minimal MQTT 5 client over mutual TLS that subscribes,
//! acknowledges messages with a chosen reason code and reports when the broker disconnects it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod mosquitto;
pub mod relay;

use mqttbytes::v5;
use rampart_node::mqtt::codec::{self, Packet, ProtocolVersion};
use rampart_node::pki::{DevPki, Kind, Store};
use rampart_proto::admin::admin_client::AdminClient;
use rampart_proto::admin::ClusterStatusRequest;
use rampart_proto::cluster::node_client::NodeClient;
use rampart_proto::cluster::raft_client::RaftClient;
pub use relay::UdpRelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The `rampart` binary: `$RAMPART_TEST_BINARY` when set (a target directory shared by several
/// checkouts may hold another checkout's build), else the one of the same build
/// (target/<profile>/rampart).
pub fn rampart_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os("RAMPART_TEST_BINARY") {
        return PathBuf::from(binary);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("profile dir") } else { dir };
    let binary = dir.join("rampart");
    assert!(binary.is_file(), "{} is missing: build it with `cargo build -p rampart-node` (same profile)", binary.display());
    binary
}

/// The `rampart` binary as a command that inherits none of the test's `RAMPART_*` variables (an
/// operator's shell after the README sets `RAMPART_ADMIN_*`): a node or CLI started by a test sees
/// only the configuration the test gives it.
pub fn rampart() -> Command {
    let mut command = Command::new(rampart_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RAMPART_") {
            command.env_remove(name);
        }
    }
    command
}

/// A port that is free now, chosen below Linux's ephemeral range (32768–60999): a port handed
/// out by `bind(0)` and released can be taken by any outgoing connection (Raft, admin and MQTT
/// clients make many) before the node binds it, and a node that cannot bind never starts. A port
/// is handed out once per test process: a chosen port is not bound until its node starts, so
/// another cluster of the same run would otherwise find it free too.
fn free_port_where(is_free: impl Fn(u16) -> bool) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !handed_out.contains(&port) && is_free(port) {
            handed_out.push(port);
            return port;
        }
    }
}

fn free_port() -> u16 {
    free_port_where(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

fn free_udp_port() -> u16 {
    free_port_where(|port| std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// Ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub mtls: u16,
    /// Plain TCP, for anonymous clients (the development state allows them on `demo/#`).
    pub tcp: u16,
    pub cluster: u16,
    pub admin: u16,
    /// Metrics and health (`/readyz`).
    pub http: u16,
    /// QUIC forwarding (UDP).
    pub quic: u16,
}

pub struct Node {
    pub id: u64,
    pub ports: Ports,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Tunables of a test cluster.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub nodes: u64,
    /// Nodes 1..=initial_members form the cluster; the others start outside it, waiting to be
    /// added through the admin API.
    pub initial_members: u64,
    pub snapshot_every: u64,
    /// Put a [`UdpRelay`] in front of this node's QUIC port: every other node reaches it through
    /// the relay, which the test can cut.
    pub quic_relay: Option<u64>,
    /// `cluster.link_idle_timeout_ms` of every node.
    pub link_idle_timeout_ms: u64,
    /// `cluster.suback_barrier` of every node (`local` or `ack`), and its timeout.
    pub suback_barrier: &'static str,
    pub suback_barrier_timeout_ms: u64,
    /// `cluster.puback` of every node (`local` or `cluster`).
    pub puback: &'static str,
    /// Lines of every node's `[limits]` section (TOML), e.g. `max_sessions_per_identity = 2`.
    pub limits: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            initial_members: 3,
            snapshot_every: 1000,
            quic_relay: None,
            link_idle_timeout_ms: 5000,
            suback_barrier: "local",
            suback_barrier_timeout_ms: 1000,
            puback: "local",
            limits: "",
        }
    }
}

pub struct TestCluster {
    /// Nodes 1..=initial_members are the initial members.
    initial_members: u64,
    /// The relay in front of `Options::quic_relay`'s QUIC port.
    pub relay: Option<UdpRelay>,
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub nodes: Vec<Node>,
}

impl TestCluster {
    /// Writes the PKI and configs and starts every node.
    pub fn start(options: Options) -> anyhow::Result<TestCluster> {
        rampart_node::tls::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let pki = rampart_node::pki::ensure_dev_pki(&dir.path().join("pki"), options.nodes as usize)?;
        let ports: Vec<Ports> = (0..options.nodes)
            .map(|_| Ports {
                mtls: free_port(),
                tcp: free_port(),
                cluster: free_port(),
                admin: free_port(),
                http: free_port(),
                quic: free_udp_port(),
            })
            .collect();
        let relay = match options.quic_relay {
            Some(id) => Some(UdpRelay::start(([127, 0, 0, 1], ports[id as usize - 1].quic).into())?),
            None => None,
        };
        let members: String = (1..=options.initial_members)
            .map(|id| {
                let p = ports[id as usize - 1];
                let quic = relay.as_ref().filter(|_| options.quic_relay == Some(id)).map_or(p.quic, |r| r.port);
                format!("[[cluster.members]]\nid = {id}\nraft_addr = \"127.0.0.1:{}\"\nquic_addr = \"127.0.0.1:{quic}\"\n", p.cluster)
            })
            .collect();
        let mut nodes = Vec::new();
        for id in 1..=options.nodes {
            let p = ports[id as usize - 1];
            let (node_cert, node_key) = &pki.nodes[id as usize - 1];
            let config = dir.path().join(format!("node-{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"[node]
data_dir = "data-{id}"
[log]
level = "info,openraft=warn"
[http]
bind = "127.0.0.1:{http}"
[auth]
state_file = {auth:?}
[limits]
{limits}
[listeners.tcp]
bind = "127.0.0.1:{tcp}"
[listeners.tls]
bind = "127.0.0.1:{mtls}"
cert_file = {server_cert:?}
key_file = {server_key:?}
client_certificate = "required"
ca_file = {ca:?}
[cluster]
node_id = {id}
bind = "127.0.0.1:{cluster}"
quic_bind = "127.0.0.1:{quic}"
link_idle_timeout_ms = {link_idle_timeout_ms}
suback_barrier = "{suback_barrier}"
suback_barrier_timeout_ms = {suback_barrier_timeout_ms}
puback = "{puback}"
cert_file = {node_cert:?}
key_file = {node_key:?}
ca_file = {ca:?}
snapshot_every = {snapshot_every}
write_timeout_ms = 3000
{members}
[admin]
bind = "127.0.0.1:{admin}"
cert_file = {server_cert:?}
key_file = {server_key:?}
ca_file = {ca:?}
"#,
                    auth = pki.auth_state,
                    mtls = p.mtls,
                    tcp = p.tcp,
                    cluster = p.cluster,
                    quic = p.quic,
                    admin = p.admin,
                    http = p.http,
                    server_cert = pki.server_cert,
                    server_key = pki.server_key,
                    ca = pki.ca_cert,
                    snapshot_every = options.snapshot_every,
                    link_idle_timeout_ms = options.link_idle_timeout_ms,
                    suback_barrier = options.suback_barrier,
                    suback_barrier_timeout_ms = options.suback_barrier_timeout_ms,
                    puback = options.puback,
                    limits = options.limits,
                ),
            )?;
            let log = dir.path().join(format!("node-{id}.log"));
            nodes.push(Node { id, ports: p, config, log, child: None });
        }
        let mut cluster = TestCluster { initial_members: options.initial_members, relay, dir, pki, nodes };
        for id in 1..=options.nodes {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    /// Starts (or restarts) a node process, appending to its log. Like an operator's shell
    /// after the README, the environment carries the admin CLI's variables (this node's).
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let (cert, key) = &self.pki.admin;
        let admin_env = [("RAMPART_ADMIN_CA", &self.pki.ca_cert), ("RAMPART_ADMIN_CERT", cert), ("RAMPART_ADMIN_KEY", key)];
        let node = &mut self.nodes[id as usize - 1];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let child = rampart()
            .envs(admin_env)
            .env("RAMPART_ADMIN_ENDPOINT", format!("https://localhost:{}", node.ports.admin))
            .arg("serve")
            .arg("--config")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    /// Sends a signal to a node's process and waits for it to exit.
    fn signal(&mut self, id: u64, signal: libc::c_int) {
        let node = &mut self.nodes[id as usize - 1];
        if let Some(mut child) = node.child.take() {
            // SAFETY: kill(2) on the PID of a child this process started and has not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            let _ = child.wait();
        }
    }

    /// `kill -9`: no shutdown, nothing flushed beyond what was already synced.
    pub fn kill(&mut self, id: u64) {
        self.signal(id, libc::SIGKILL);
    }

    /// A clean stop (SIGTERM).
    pub fn stop(&mut self, id: u64) {
        self.signal(id, libc::SIGTERM);
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).child.is_some()
    }

    /// A running node's resident memory in bytes (`VmRSS` of its process).
    pub fn rss(&self, id: u64) -> Option<u64> {
        let pid = self.node(id).child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
        Some(kib * 1024)
    }

    /// An admin client of a node, with the admin certificate.
    pub async fn admin(&self, id: u64) -> anyhow::Result<AdminClient<Channel>> {
        let (cert, key) = &self.pki.admin;
        self.admin_as(id, Some((cert, key))).await
    }

    /// An admin client presenting another certificate, or none.
    pub async fn admin_as(&self, id: u64, identity: Option<(&Path, &Path)>) -> anyhow::Result<AdminClient<Channel>> {
        let endpoint = format!("https://localhost:{}", self.node(id).ports.admin);
        rampart_node::admin::cli::connect(&endpoint, Some(&self.pki.ca_cert), identity).await
    }

    /// Waits until a running initial member reports a leader that every running initial member
    /// agrees on.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for node in self.nodes.iter().filter(|n| n.child.is_some() && n.id <= self.initial_members) {
                let status = async { anyhow::Ok(self.admin(node.id).await?.cluster_status(ClusterStatusRequest {}).await?.into_inner()) };
                leaders.push(tokio::time::timeout(Duration::from_secs(3), status).await.ok().and_then(Result::ok).map(|s| s.leader_id));
            }
            if let Some(Some(leader)) = leaders.first() {
                if *leader != 0 && self.is_running(*leader) && leaders.iter().all(|l| *l == Some(*leader)) {
                    return Ok(*leader);
                }
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = (self.nodes.iter())
                    .map(|n| {
                        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(3).collect();
                        format!("node {} (running: {}): {}", n.id, self.is_running(n.id), tail.join(" | "))
                    })
                    .collect();
                anyhow::bail!("no agreed leader within {timeout:?}: {leaders:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `rampart admin …` against a node with the admin certificate.
    pub fn cli(&self, id: u64, args: &[&str]) -> std::process::Output {
        let (cert, key) = &self.pki.admin;
        rampart()
            .arg("admin")
            .args(args)
            .env("RAMPART_ADMIN_ENDPOINT", format!("https://localhost:{}", self.node(id).ports.admin))
            .env("RAMPART_ADMIN_CA", &self.pki.ca_cert)
            .env("RAMPART_ADMIN_CERT", cert)
            .env("RAMPART_ADMIN_KEY", key)
            .output()
            .expect("run rampart admin")
    }

    /// The status line and body of a node's `GET /readyz`.
    pub fn readyz(&self, id: u64) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.node(id).ports.http))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        tcp.read_to_string(&mut response)?;
        Ok(response)
    }

    /// A device certificate (cert, key) issued by the cluster's CA.
    pub fn issue_device(&self, id: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let store = Store::new(self.dir.path().join("pki"));
        let issued = store.issue(Kind::Device, id, &[], 30)?;
        Ok((issued.cert, issued.key))
    }

    /// A metric of one node, summed over its label sets when `series` has no labels; -1 when
    /// the node does not answer.
    pub fn metric(&self, node: u64, series: &str) -> i64 {
        use std::io::{Read, Write};
        let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", self.node(node).ports.http)) else { return -1 };
        let _ = tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        text.lines().filter_map(|l| l.strip_prefix(series)).filter_map(|rest| rest.trim().parse::<i64>().ok()).sum()
    }

    /// Waits for a leader, until every running initial member serves devices (the seeded
    /// authorization state is applied everywhere) and until their links to each other are up: a
    /// route or a client-id claim made before a link is up reaches that peer only when it connects.
    pub async fn wait_until_serving(&self) -> anyhow::Result<()> {
        const SERVING_TIMEOUT: Duration = Duration::from_secs(60);
        self.wait_for_leader(SERVING_TIMEOUT).await?;
        let (_, cert, key) = self.pki.devices.iter().find(|(n, _, _)| n == "device-1").expect("device-1");
        let deadline = Instant::now() + SERVING_TIMEOUT;
        let running: Vec<u64> = (1..=self.initial_members).filter(|&id| self.is_running(id)).collect();
        for &node in &running {
            loop {
                let connected = mqtt_connect(self.node(node).ports.mtls, &self.pki.ca_cert, cert, key, "device-1-probe").await;
                if matches!(connected, Ok((0, _))) {
                    break;
                }
                let answer = connected.map(|(code, _)| code).map_err(|e| e.to_string());
                anyhow::ensure!(Instant::now() < deadline, "node {node} does not serve device-1: {answer:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for &node in &running {
            for &peer in running.iter().filter(|&&peer| peer != node) {
                let series = format!("rampart_forward_link_up{{peer=\"{peer}\"}}");
                while self.metric(node, &series) < 1 {
                    anyhow::ensure!(Instant::now() < deadline, "node {node}'s forwarding link to node {peer} is not up");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Ok(())
    }

    /// The TLS identity of node `id`'s certificate (for calls made as that node).
    pub fn node_identity(&self, id: u64) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let (cert, key) = &self.pki.nodes[id as usize - 1];
        Ok((std::fs::read(cert)?, std::fs::read(key)?))
    }

    /// A client of node `target`'s cluster port (`Node` service) presenting `identity`.
    pub async fn node_client(&self, target: u64, identity: (Vec<u8>, Vec<u8>)) -> anyhow::Result<NodeClient<Channel>> {
        Ok(NodeClient::new(self.cluster_channel(target, identity).await?))
    }

    /// A client of node `target`'s cluster port (`Raft` service) presenting `identity`.
    pub async fn raft_client(&self, target: u64, identity: (Vec<u8>, Vec<u8>)) -> anyhow::Result<RaftClient<Channel>> {
        Ok(RaftClient::new(self.cluster_channel(target, identity).await?))
    }

    async fn cluster_channel(&self, target: u64, (cert, key): (Vec<u8>, Vec<u8>)) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.pki.ca_cert)?))
            .identity(Identity::from_pem(cert, key))
            .domain_name("localhost");
        let endpoint = format!("https://127.0.0.1:{}", self.node(target).ports.cluster);
        Ok(Endpoint::from_shared(endpoint)?.tls_config(tls)?.connect().await?)
    }

    /// Dials node `target`'s forwarding port (QUIC) with `identity` and says `Hello` as node
    /// `claimed`. Returns why the node closed the link, or `Welcome` when it accepted it.
    pub async fn quic_hello(&self, target: u64, identity: (Vec<u8>, Vec<u8>), claimed: u64) -> anyhow::Result<String> {
        use rampart_node::forward::frame::{self, Control, Reply};
        use rustls_pki_types::pem::PemObject;
        let read_pem = |pem: &[u8]| rustls_pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>();
        let certs: Vec<rustls_pki_types::CertificateDer<'static>> = read_pem(&identity.0)?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&identity.1)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_pem(&std::fs::read(&self.pki.ca_cert)?)? {
            roots.add(ca)?;
        }
        let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(certs, key)?;
        tls.alpn_protocols = vec![frame::ALPN.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
        let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        endpoint.set_default_client_config(config);
        let connection = endpoint.connect(([127, 0, 0, 1], self.node(target).ports.quic).into(), "localhost")?.await?;
        let exchange = async {
            let (mut control, mut replies) = connection.open_bi().await?;
            let mut out = bytes::BytesMut::new();
            frame::encode(&Control::Hello { node_id: claimed, incarnation: 1 }, &mut out)?;
            control.write_all(&out).await?;
            let mut input = bytes::BytesMut::new();
            loop {
                if let Some(reply) = frame::decode::<Reply>(&mut input)? {
                    return anyhow::Ok(format!("{reply:?}"));
                }
                let mut chunk = [0u8; 4096];
                match replies.read(&mut chunk).await? {
                    Some(n) => input.extend_from_slice(&chunk[..n]),
                    None => anyhow::bail!("the stream ended without a reply"),
                }
            }
        };
        let answer = match tokio::time::timeout(Duration::from_secs(10), exchange).await? {
            Ok(reply) => reply,
            // The node may close the connection at any step (before it reads the Hello, too).
            Err(e) => match connection.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(close)) => String::from_utf8_lossy(&close.reason).into_owned(),
                _ => return Err(e),
            },
        };
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(answer)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.kill(id);
        }
    }
}

/// An MQTT 5 connection over mutual TLS, after its CONNACK.
pub struct MqttClient {
    stream: TlsStream<TcpStream>,
    input: bytes::BytesMut,
}

/// How a connection attempt ended: the CONNACK reason code (0 = accepted).
pub async fn mqtt_connect(port: u16, ca: &Path, cert: &Path, key: &Path, client_id: &str) -> anyhow::Result<(u8, MqttClient)> {
    let mut connect = v5::Connect::new(client_id);
    connect.keep_alive = 60;
    let (connack, client) = mqtt_connect_with(port, ca, cert, key, connect).await?;
    Ok((connack.code as u8, client))
}

/// Connects with a revoked certificate: `Ok` when the TLS handshake is refused with the alert
/// `certificate_revoked` (under TLS 1.3 the client reads it after sending CONNECT), else what
/// happened instead.
pub async fn mqtt_connect_revoked(port: u16, ca: &Path, cert: &Path, key: &Path, client_id: &str) -> Result<(), String> {
    match mqtt_connect(port, ca, cert, key, client_id).await {
        Ok((code, _)) => Err(format!("CONNACK {code:#04x}")),
        Err(e) if format!("{e:#}").contains("CertificateRevoked") => Ok(()),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Sends `connect` over mutual TLS and returns the CONNACK (whatever its code) and the connection.
pub async fn mqtt_connect_with(
    port: u16,
    ca: &Path,
    cert: &Path,
    key: &Path,
    connect: v5::Connect,
) -> anyhow::Result<(v5::ConnAck, MqttClient)> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)?;
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key)?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let mut client = MqttClient { stream, input: bytes::BytesMut::new() };
    client.send(&Packet::Connect(connect)).await?;
    match client.next_packet(Duration::from_secs(20)).await? {
        Some(Packet::ConnAck(connack)) => Ok((connack, client)),
        other => anyhow::bail!("expected CONNACK, got {other:?}"),
    }
}

impl MqttClient {
    /// Sends one packet (flushed: TLS may keep written bytes until then).
    pub async fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        let mut out = bytes::BytesMut::new();
        codec::encode(ProtocolVersion::V5, packet, &mut out, None)?;
        self.stream.write_all(&out).await?;
        Ok(self.stream.flush().await?)
    }

    /// The next packet from the broker if one comes within `wait`.
    pub async fn next_packet(&mut self, wait: Duration) -> anyhow::Result<Option<Packet>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(packet) = codec::decode(ProtocolVersion::V5, &mut self.input, usize::MAX)? {
                return Ok(Some(packet));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.input)).await {
                Err(_) => return Ok(None),
                Ok(read) => anyhow::ensure!(read? > 0, "the broker closed the connection"),
            }
        }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK, the next packet.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let mut early = Vec::new();
        self.subscribe_keeping(filter, mqttbytes::QoS::AtLeastOnce, &mut early).await?;
        anyhow::ensure!(early.is_empty(), "packets before the SUBACK: {early:?}");
        Ok(())
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK granting it, keeping the packets
    /// that arrive before it (e.g. queued messages of a resumed session) in `early`.
    pub async fn subscribe_keeping(&mut self, filter: &str, qos: mqttbytes::QoS, early: &mut Vec<Packet>) -> anyhow::Result<()> {
        let mut subscribe = v5::Subscribe::new(filter, qos);
        subscribe.pkid = 1;
        self.send(&Packet::Subscribe(subscribe)).await?;
        let granted = match qos {
            mqttbytes::QoS::AtMostOnce => v5::SubscribeReasonCode::QoS0,
            mqttbytes::QoS::AtLeastOnce => v5::SubscribeReasonCode::QoS1,
            mqttbytes::QoS::ExactlyOnce => v5::SubscribeReasonCode::QoS2,
        };
        loop {
            match self.next_packet(Duration::from_secs(10)).await? {
                Some(Packet::SubAck(ack)) if ack.return_codes == [granted] => return Ok(()),
                Some(Packet::SubAck(ack)) => anyhow::bail!("expected SUBACK granting {qos:?}, got {ack:?}"),
                Some(other) => early.push(other),
                None => anyhow::bail!("no SUBACK within 10 s"),
            }
        }
    }

    /// Answers a QoS 1 PUBLISH with a PUBACK carrying `reason`.
    pub async fn puback(&mut self, pkid: u16, reason: v5::PubAckReason) -> anyhow::Result<()> {
        self.send(&Packet::PubAck(v5::PubAck { pkid, reason, properties: None })).await
    }

    /// Waits until the broker ends the connection; returns when, and the DISCONNECT reason code
    /// if one was sent.
    pub async fn wait_disconnect(mut self, timeout: Duration) -> anyhow::Result<(Instant, Option<u8>)> {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(timeout, self.stream.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("still connected after {timeout:?}"))?;
        let at = Instant::now();
        let n = read.unwrap_or(0);
        if n < 3 || buf[0] != 0xE0 {
            return Ok((at, None));
        }
        // The reason code follows the variable-length remaining length.
        let length_bytes = buf[1..n].iter().position(|b| b & 0x80 == 0).map_or(n, |i| i + 1);
        Ok((at, buf.get(1 + length_bytes).copied()))
    }
}
