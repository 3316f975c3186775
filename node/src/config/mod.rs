//! The node's configuration: a TOML file (every key documented in `docs/configuration.md`) with
//! environment overrides (`RAMPART__<SECTION>__<KEY>`, e.g. `RAMPART__LIMITS__MAX_CONNECTIONS=500`),
//! checked once at start into one validated [`Config`]. Unknown keys and bad values are errors
//! that name the file (or variable), the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::identity::{IdentityRule, IdentitySource};
use crate::auth::password_gate::PasswordGate;
use crate::auth::policy::{AuthPolicy, ClientIdPolicy, UnauthorizedPublish, UsernameMismatch};
use crate::broker::retained::RetainedLimits;
use crate::broker::BrokerSettings;
use crate::mqtt::connect::SessionLimits;
use crate::telemetry::LogConfig;
use crate::topic::TopicLimits;

/// The largest `limits.max_packet_size` of a clustered node: every message must fit in one frame
/// of a forwarding link.
pub const MAX_CLUSTERED_PACKET_SIZE: usize = 15 << 20;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub limits: LimitsConfig,
    pub listeners: ListenersConfig,
    /// Raft membership; without it the node runs standalone from `auth.state_file`.
    pub cluster: Option<ClusterConfig>,
    /// The admin gRPC API (needs `[cluster]`).
    pub admin: Option<AdminConfig>,
}

/// This node's place in a Raft cluster that replicates the authorization state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: unique in the cluster, never reused after a node's data is lost. 0 in
    /// the file means unset: then `node_id_from_hostname` must give it.
    #[serde(default)]
    pub node_id: u64,
    /// Take `node_id` from the host name's trailing `-<ordinal>`, plus 1 (`rampart-0` → 1), so
    /// the pods of a Kubernetes StatefulSet can share one config file.
    #[serde(default)]
    pub node_id_from_hostname: bool,
    /// Address of the cluster gRPC port (Raft and node-to-node calls).
    #[serde(default = "default_cluster_bind")]
    pub bind: SocketAddr,
    /// This node's certificate (OU rampart-node, serverAuth + clientAuth) and key, and the CA
    /// bundle peers' node certificates must chain to.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    /// The initial members. Starting them all initializes the cluster once (the lowest id does
    /// it); later starts resume it. A node not listed here waits to be added (`rampart admin
    /// cluster add-node`).
    #[serde(default)]
    pub members: Vec<Member>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// A snapshot is taken after this many log entries (and older entries purged).
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// How long an admin write may wait for a leader and a commit before it fails (Unavailable).
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// UDP address of this node's QUIC forwarding port (messages to and from other nodes).
    #[serde(default = "default_quic_bind")]
    pub quic_bind: SocketAddr,
    /// Publish streams per forwarding link (a topic always uses the same one: per-topic order).
    #[serde(default = "default_forward_streams")]
    pub forward_streams: u8,
    /// Messages waiting for one peer before QoS 0, then the oldest, are dropped (counted).
    #[serde(default = "default_forward_queue_messages")]
    pub forward_queue_messages: usize,
    /// QoS 1/2 messages sent to one peer and kept until it acknowledges them, for replay after
    /// a reconnect.
    #[serde(default = "default_forward_replay_messages")]
    pub forward_replay_messages: usize,
    /// A forwarding link without a packet for this long is dead (keep-alives every quarter).
    #[serde(default = "default_link_idle_timeout_ms")]
    pub link_idle_timeout_ms: u64,
    /// How long a CONNECT waits for the other nodes to give up its client id (take over a live
    /// connection, hand over a persistent session).
    #[serde(default = "default_claim_timeout_ms")]
    pub claim_timeout_ms: u64,
    /// What a CONNECT does when some node cannot be asked about its client id.
    #[serde(default)]
    pub remote_session_unreachable: RemoteSessionUnreachable,
    /// When a SUBACK is sent: at once (`local`), or once the other nodes have the route (`ack`).
    #[serde(default)]
    pub suback_barrier: SubackBarrier,
    /// The longest a SUBACK waits for the other nodes with `suback_barrier = "ack"`.
    #[serde(default = "default_suback_barrier_timeout_ms")]
    pub suback_barrier_timeout_ms: u64,
    /// When a QoS 1/2 publisher is acknowledged: once the message is routed here (`local`), or
    /// also acknowledged by the other nodes it went to (`cluster`).
    #[serde(default)]
    pub puback: PubackPolicy,
    /// The longest a PUBACK/PUBREC waits for the other nodes with `puback = "cluster"`.
    #[serde(default = "default_puback_cluster_timeout_ms")]
    pub puback_cluster_timeout_ms: u64,
}

/// When a QoS 1/2 publisher gets its PUBACK/PUBREC in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PubackPolicy {
    /// Once the message is queued for this node's subscribers (and on disk for durable ones);
    /// a message on its way to another node is lost if this node crashes first.
    #[default]
    Local,
    /// Also once every node with a live link the message went to has queued it (bounded by
    /// `puback_cluster_timeout_ms`).
    Cluster,
}

/// When a SUBACK is sent in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubackBarrier {
    /// At once: a message published on another node in the next milliseconds may miss the new
    /// subscription.
    #[default]
    Local,
    /// After every node with a live link has applied the new route (bounded by
    /// `suback_barrier_timeout_ms`): a publish anywhere after the SUBACK reaches the subscriber.
    Ack,
}

/// What a CONNECT does when a node that may hold the client's session cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteSessionUnreachable {
    /// Accept the client (availability first): its session elsewhere, if any, stays there until
    /// that node is reachable again and the client reconnects.
    #[default]
    Proceed,
    /// Refuse the client with CONNACK server unavailable (0x88 / rc 3) until every node answers.
    Refuse,
}

/// One cluster member: its id and the addresses other nodes reach it at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    /// host:port of its cluster gRPC port; the host must be in its node certificate.
    pub raft_addr: String,
    /// host:port of its QUIC forwarding port.
    #[serde(default)]
    pub quic_addr: String,
}

fn default_cluster_bind() -> SocketAddr {
    "0.0.0.0:7070".parse().expect("valid address")
}
fn default_heartbeat_ms() -> u64 {
    // Also openraft's AppendEntries timeout: large batches (bulk imports) need the room.
    250
}
fn default_election_timeout_min_ms() -> u64 {
    1000
}
fn default_election_timeout_max_ms() -> u64 {
    2000
}
fn default_snapshot_every() -> u64 {
    1000
}
fn default_write_timeout_ms() -> u64 {
    10_000
}
fn default_quic_bind() -> SocketAddr {
    "0.0.0.0:7071".parse().expect("valid address")
}
fn default_forward_streams() -> u8 {
    4
}
fn default_forward_queue_messages() -> usize {
    100_000
}
fn default_forward_replay_messages() -> usize {
    100_000
}
fn default_link_idle_timeout_ms() -> u64 {
    5_000
}
fn default_claim_timeout_ms() -> u64 {
    3_000
}
fn default_suback_barrier_timeout_ms() -> u64 {
    1_000
}
fn default_puback_cluster_timeout_ms() -> u64 {
    5_000
}

/// The admin gRPC API: mutual TLS with admin certificates (OU rampart-admin) only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// The API's server certificate and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA bundle admin certificates must chain to.
    pub ca_file: PathBuf,
}

fn default_admin_bind() -> SocketAddr {
    "0.0.0.0:9443".parse().expect("valid address")
}

/// This node's own storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Folder for node-local data (durable APPLICATION sessions); relative to the config file.
    pub data_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { data_dir: PathBuf::from("rampart-data") }
    }
}

/// How certificate identities are used at CONNECT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub use_identity_as_username: bool,
    pub username_mismatch: UsernameMismatch,
    pub client_id_policy: ClientIdPolicy,
    /// The one character that separates the identity from a suffix under the `prefix` policy.
    pub client_id_separator: char,
    /// TOML file with credentials, roles, default rules and revocations (re-read on SIGHUP).
    /// Without it, every authenticated client may publish and subscribe anywhere.
    pub state_file: Option<PathBuf>,
    /// What an MQTT 3.1.1 client gets for an unauthorized PUBLISH (MQTT 5 gets a reason code).
    pub v3_unauthorized_publish: UnauthorizedPublish,
    /// This node's limits on the `http` provider: hosts it may call, CA for https.
    pub http: crate::auth::http::HttpNodeConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        let policy = AuthPolicy::default();
        AuthConfig {
            use_identity_as_username: policy.use_identity_as_username,
            username_mismatch: policy.username_mismatch,
            client_id_policy: policy.client_id_policy,
            client_id_separator: policy.client_id_separator,
            state_file: None,
            v3_unauthorized_publish: UnauthorizedPublish::Disconnect,
            http: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub bind: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { enabled: true, bind: "0.0.0.0:9090".parse().expect("valid address") }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    /// New connections let in per second across all listeners (0: no pacing); past it they
    /// wait for their turn.
    pub accept_rate: u32,
    /// New connections let in at once before `accept_rate` paces them.
    pub accept_burst: u32,
    pub connect_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub max_packet_size: usize,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub application_max_queued_messages: usize,
    pub slow_subscriber_timeout_ms: u64,
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
    pub topic_alias_maximum: u16,
    pub max_keep_alive_secs: u16,
    pub max_session_expiry_secs: u64,
    pub takeover_timeout_secs: u64,
    /// Subscriptions one session may hold; more are refused (SUBACK 0x97 quota exceeded).
    pub max_subscriptions_per_session: usize,
    /// Bytes (topic + payload) of retained messages one session may have waiting after SUBSCRIBE; more are dropped.
    pub max_retained_replay_bytes: usize,
    /// Topic aliases the broker uses towards one client (also capped by the client's own maximum).
    pub max_outgoing_topic_aliases: u16,
    /// How long a shared-group member may leave a message unacknowledged before another member
    /// gets it too; 0: no limit.
    pub shared_ack_timeout_ms: u64,
    /// Sessions (online and offline) one certificate identity or password credential may hold.
    pub max_sessions_per_identity: usize,
    /// Sessions (online and offline) all anonymous clients together may hold.
    pub max_anonymous_sessions: usize,
    /// Idle time before TCP keepalive probes start on an accepted socket; 0 turns keepalive off.
    pub tcp_keepalive_secs: u64,
    /// Time between TCP keepalive probes.
    pub tcp_keepalive_interval_secs: u64,
    /// Password checks (argon2id) running at once on this node; more wait their turn.
    pub password_checks_concurrent: usize,
    /// Password checks one source address may start per minute; 0 turns the rate limit off.
    pub password_checks_per_source_per_minute: u32,
    /// Password checks one source address may start at once after being quiet.
    pub password_checks_burst: u32,
    /// Retained messages (topics) stored on this node; a retained PUBLISH to a new topic past it is not stored.
    pub max_retained_messages: usize,
    /// Bytes of retained messages (topic + payload) stored on this node; same effect as `max_retained_messages`.
    pub max_retained_bytes: usize,
    /// Retained messages one principal may have set on this node; past it a retained PUBLISH to
    /// a new topic is refused (PUBACK/PUBREC 0x97).
    pub max_retained_per_client: usize,
    /// Bytes of them; same effect.
    pub max_retained_bytes_per_client: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            accept_rate: 0,
            accept_burst: 100,
            connect_timeout_secs: 10,
            write_timeout_secs: 30,
            max_packet_size: 1024 * 1024,
            receive_maximum: 100,
            max_inflight: 100,
            max_queued_messages: 1000,
            application_max_queued_messages: 100_000,
            slow_subscriber_timeout_ms: 5000,
            max_topic_length: 1024,
            max_topic_levels: 32,
            topic_alias_maximum: 64,
            max_keep_alive_secs: u16::MAX,
            max_session_expiry_secs: 7 * 24 * 3600,
            takeover_timeout_secs: 10,
            max_subscriptions_per_session: 1000,
            max_retained_replay_bytes: 16 << 20,
            max_outgoing_topic_aliases: 64,
            shared_ack_timeout_ms: 30_000,
            max_sessions_per_identity: 100,
            max_anonymous_sessions: 10_000,
            tcp_keepalive_secs: 60,
            tcp_keepalive_interval_secs: 10,
            password_checks_concurrent: 4,
            password_checks_per_source_per_minute: 120,
            password_checks_burst: 20,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 1024 * 1024 * 1024,
            max_retained_per_client: 10_000,
            max_retained_bytes_per_client: 64 * 1024 * 1024,
        }
    }
}

/// The MQTT listeners. A missing `tcp` section means plain TCP on 0.0.0.0:1883 (disable it with
/// `enabled = false`); missing `tls`, `ws` and `wss` sections mean those listeners are off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenersConfig {
    pub tcp: Option<PlainListener>,
    pub tls: Option<TlsListener>,
    pub ws: Option<PlainListener>,
    pub wss: Option<TlsListener>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainListener {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub bind: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub bind: Option<SocketAddr>,
    /// PEM file with the server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Whether clients must present a certificate.
    #[serde(default)]
    pub client_certificate: ClientCertificate,
    /// PEM bundle of the CAs client certificates must chain to (required unless `client_certificate = "none"`).
    pub ca_file: Option<PathBuf>,
    /// CRL files (PEM or DER, one per issuing CA) checked at every handshake.
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// Certificate field the client identity is taken from.
    #[serde(default)]
    pub identity_source: IdentitySource,
    /// Regex with a named group `id` extracting the identity from that field.
    pub identity_pattern: Option<String>,
}

/// Client certificate requirement of a TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificate {
    /// Clients are not asked for a certificate.
    #[default]
    None,
    /// Clients may present one; those without fall through to other authentication.
    Optional,
    /// The TLS handshake fails without a valid client certificate.
    Required,
}

fn yes() -> bool {
    true
}

/// A listener ready to bind.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// TCP keepalive for accepted sockets; `None`: off.
    pub tcp_keepalive: Option<TcpKeepalive>,
}

/// TCP keepalive of accepted sockets (`limits.tcp_keepalive_secs` and `_interval_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Idle time before the first probe.
    pub time: Duration,
    /// Time between probes.
    pub interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            ListenerKind::Tcp => 1883,
            ListenerKind::Tls => 8883,
            ListenerKind::Ws => 8083,
            ListenerKind::Wss => 8084,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set when clients are asked for certificates.
    pub client_auth: Option<ClientAuth>,
}

/// Verification of client certificates on a TLS listener.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    pub required: bool,
    pub ca_file: PathBuf,
    pub crl_files: Vec<PathBuf>,
    pub identity: IdentityRule,
}

fn tls_files(listener: &TlsListener) -> TlsFiles {
    let client_auth =
        listener.ca_file.as_ref().filter(|_| listener.client_certificate != ClientCertificate::None).map(|ca_file| ClientAuth {
            required: listener.client_certificate == ClientCertificate::Required,
            ca_file: ca_file.clone(),
            crl_files: listener.crl_files.clone(),
            identity: IdentityRule::new(listener.identity_source, listener.identity_pattern.as_deref()).expect("validated"),
        });
    TlsFiles { cert_file: listener.cert_file.clone(), key_file: listener.key_file.clone(), client_auth }
}

/// Largest TCP keepalive time or interval: Linux takes at most 32767 seconds.
const MAX_TCP_KEEPALIVE_SECS: u64 = 32_767;

/// Environment variables starting with this override config keys; `__` separates path segments.
/// The double underscore keeps the namespace apart from the command line's own variables
/// (`RAMPART_CONFIG`, `RAMPART_ADMIN_*`, `RAMPART_PKI_DIR`), which are never config keys.
const ENV_PREFIX: &str = "RAMPART__";

/// Sets `SECTION__KEY` (case-insensitive) in `table`; the value is read as a TOML value
/// (number, boolean, ...) when it parses as one, else as a string.
fn apply_override(table: &mut toml::Table, path: &str, value: &str) -> Result<(), String> {
    let segments: Vec<String> = path.split("__").map(str::to_lowercase).collect();
    let (last, parents) = segments.split_last().ok_or("empty key")?;
    let mut current = table;
    for segment in parents {
        current = current
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{segment} is not a section"))?;
    }
    let parsed = format!("v = {value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    current.insert(last.clone(), parsed.unwrap_or_else(|| toml::Value::String(value.to_string())));
    Ok(())
}

/// The node id for `cluster.node_id_from_hostname`: the trailing `-<ordinal>` of the host name's
/// first label, plus 1 (`rampart-0` and `rampart-0.rampart-headless` → 1, `rampart-2` → 3).
pub fn node_id_from_hostname(hostname: &str) -> Result<u64, String> {
    let label = hostname.split('.').next().unwrap_or_default();
    label
        .rsplit_once('-')
        .map(|(_, ordinal)| ordinal)
        .filter(|ordinal| !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|ordinal| ordinal.parse::<u64>().ok())
        .and_then(|ordinal| ordinal.checked_add(1))
        .ok_or_else(|| format!("host name {hostname:?} does not end in -<ordinal> (such as rampart-0, which gives node id 1)"))
}

/// This machine's host name (gethostname(2)).
fn system_hostname() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which gethostname writes at most `len` bytes into.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..len].to_vec()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A configuration problem: the file, the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

/// Every problem found in a configuration, in the order found; never empty.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The first problem found.
    pub fn first(&self) -> &ConfigError {
        &self.0[0]
    }
}

impl std::fmt::Display for ConfigErrors {
    /// One problem a line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects the problems of one file.
struct Problems<'a> {
    file: &'a str,
    found: Vec<ConfigError>,
}

impl Problems<'_> {
    fn add(&mut self, key: &str, reason: String) {
        self.found.push(ConfigError { file: self.file.into(), key: key.into(), reason });
    }

    fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.found.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.found))
        }
    }
}

/// Removes the value at `path` (as serde_path_to_error reports it) from `table`, so that
/// deserializing again can find the next problem; false when there is nothing to remove.
fn remove_at(table: &mut toml::Table, path: &serde_path_to_error::Path) -> bool {
    let segments: Vec<&serde_path_to_error::Segment> = path.iter().collect();
    let mut root = toml::Value::Table(std::mem::take(table));
    let removed = remove_in(&mut root, &segments);
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    removed
}

fn remove_in(value: &mut toml::Value, segments: &[&serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    match (segments, value) {
        ([Segment::Map { key }], toml::Value::Table(t)) => t.remove(key.as_str()).is_some(),
        ([Segment::Seq { index }], toml::Value::Array(a)) if *index < a.len() => {
            a.remove(*index);
            true
        }
        ([Segment::Map { key }, rest @ ..], toml::Value::Table(t)) => t.get_mut(key.as_str()).is_some_and(|v| remove_in(v, rest)),
        ([Segment::Seq { index }, rest @ ..], toml::Value::Array(a)) => a.get_mut(*index).is_some_and(|v| remove_in(v, rest)),
        _ => false,
    }
}

impl Config {
    /// Reads and validates a config file, reporting every problem found. Relative paths inside
    /// it are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![ConfigError { file: file.clone(), key: "(file)".into(), reason: e.to_string() }]))?;
        Config::parse(&text, &file, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates config text with the process environment's overrides applied;
    /// `file` names it in errors, `base` resolves relative paths.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
        Config::parse_with_env(text, file, base, std::env::vars())
    }

    /// [`Config::parse`] with the environment given explicitly.
    pub fn parse_with_env(
        text: &str,
        file: &str,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        Config::parse_with_env_and_hostname(text, file, base, env, system_hostname)
    }

    /// [`Config::parse_with_env`] with the host name (read only for
    /// `cluster.node_id_from_hostname = true`) given explicitly.
    ///
    /// Every problem is reported, not only the first: a syntax error stops the reading (nothing
    /// after it can be trusted), an unknown key or a bad value is reported and left out so the
    /// rest is still read, and the checks of values and files then run on what remains (those
    /// about a key already reported are left out).
    pub fn parse_with_env_and_hostname(
        text: &str,
        file: &str,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        hostname: impl FnOnce() -> std::io::Result<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigError {
                file: file.into(),
                key: "(syntax)".into(),
                reason: e.message().to_string() + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
            }])
        })?;
        let mut found = Vec::new();
        for (name, value) in env {
            if let Some(path) = name.strip_prefix(ENV_PREFIX).filter(|p| !p.is_empty()) {
                if let Err(reason) = apply_override(&mut table, path, &value) {
                    found.push(ConfigError { file: format!("environment {name}"), key: path.to_lowercase().replace("__", "."), reason });
                }
            }
        }
        let mut p = Problems { file, found };
        let mut config: Config = loop {
            match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(config) => break config,
                Err(e) => {
                    let path = e.path().clone();
                    let key = path.to_string();
                    p.add(if key == "." { "(top level)" } else { &key }, e.into_inner().message().to_string());
                    if !remove_at(&mut table, &path) {
                        return Err(ConfigErrors(p.found));
                    }
                }
            }
        };
        if let Some(cluster) = config.cluster.as_mut().filter(|c| c.node_id_from_hostname) {
            if cluster.node_id != 0 {
                p.add("cluster.node_id", "set either cluster.node_id or cluster.node_id_from_hostname = true, not both".into());
            } else {
                match hostname().map_err(|e| format!("cannot read the host name: {e}")).and_then(|name| node_id_from_hostname(&name)) {
                    Ok(id) => cluster.node_id = id,
                    Err(reason) => p.add("cluster.node_id_from_hostname", reason),
                }
            }
        }
        if config.node.data_dir.is_relative() {
            config.node.data_dir = base.join(&config.node.data_dir);
        }
        if let Some(path) = config.auth.state_file.as_mut().filter(|p| p.is_relative()) {
            *path = base.join(&*path);
        }
        if let Some(path) = config.auth.http.ca_file.as_mut().filter(|p| p.is_relative()) {
            *path = base.join(&*path);
        }
        for listener in [&mut config.listeners.tls, &mut config.listeners.wss].into_iter().flatten() {
            let paths = [&mut listener.cert_file, &mut listener.key_file]
                .into_iter()
                .chain(listener.ca_file.as_mut())
                .chain(listener.crl_files.iter_mut());
            for path in paths {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        let cluster_files = config.cluster.iter_mut().flat_map(|c| [&mut c.cert_file, &mut c.key_file, &mut c.ca_file]);
        let admin_files = config.admin.iter_mut().flat_map(|a| [&mut a.cert_file, &mut a.key_file, &mut a.ca_file]);
        for path in cluster_files.chain(admin_files) {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        let mut checks = Problems { file, found: Vec::new() };
        config.validate(&mut checks);
        let within =
            |inner: &str, outer: &str| inner.strip_prefix(outer).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
        let related = |a: &str, b: &str| within(a, b) || within(b, a);
        let new: Vec<ConfigError> =
            checks.found.into_iter().filter(|c| !p.found.iter().any(|reported| related(&c.key, &reported.key))).collect();
        p.found.extend(new);
        p.into_result(config)
    }

    fn validate_cluster(&self, p: &mut Problems) {
        if let (Some(_), None) = (&self.admin, &self.cluster) {
            p.add("admin", "the admin API needs a [cluster] section (a one-member cluster is fine)".into());
        }
        let Some(c) = &self.cluster else { return };
        let files =
            [("cert_file", &c.cert_file), ("key_file", &c.key_file), ("ca_file", &c.ca_file)].map(|(k, p)| (format!("cluster.{k}"), p));
        let admin = self.admin.iter().flat_map(|a| [("cert_file", &a.cert_file), ("key_file", &a.key_file), ("ca_file", &a.ca_file)]);
        for (key, path) in files.into_iter().chain(admin.map(|(k, p)| (format!("admin.{k}"), p))) {
            if !path.is_file() {
                p.add(&key, format!("{} is not a readable file", path.display()));
            }
        }
        // With node_id_from_hostname, a host name without an ordinal is reported as such.
        if c.node_id == 0 && !c.node_id_from_hostname {
            p.add("cluster.node_id", "required, at least 1 (or set cluster.node_id_from_hostname = true)".into());
        }
        let mut ids = std::collections::HashSet::new();
        for (i, m) in c.members.iter().enumerate() {
            if m.id == 0 || !ids.insert(m.id) {
                p.add(&format!("cluster.members[{i}].id"), format!("{} is zero or listed twice", m.id));
            }
            let not_host_port =
                |addr: &str| addr.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err());
            if not_host_port(&m.raft_addr) {
                p.add(&format!("cluster.members[{i}].raft_addr"), format!("{:?} is not host:port", m.raft_addr));
            }
            if !m.quic_addr.is_empty() && not_host_port(&m.quic_addr) {
                p.add(&format!("cluster.members[{i}].quic_addr"), format!("{:?} is not host:port", m.quic_addr));
            }
        }
        if c.forward_streams == 0 || c.forward_queue_messages == 0 || c.forward_replay_messages == 0 || c.link_idle_timeout_ms < 100 {
            p.add(
                "cluster.forward_streams / forward_queue_messages / forward_replay_messages / link_idle_timeout_ms",
                "need at least 1 stream, 1 queued and 1 replayed message, and an idle timeout of at least 100 ms".into(),
            );
        }
        if c.heartbeat_ms == 0 || c.election_timeout_min_ms <= c.heartbeat_ms || c.election_timeout_max_ms <= c.election_timeout_min_ms {
            p.add(
                "cluster.heartbeat_ms / election_timeout_min_ms / election_timeout_max_ms",
                "need 0 < heartbeat < election_timeout_min < election_timeout_max".into(),
            );
        }
        if c.snapshot_every == 0 || c.write_timeout_ms == 0 {
            p.add("cluster.snapshot_every / cluster.write_timeout_ms", "must be at least 1".into());
        }
    }

    /// Checks the values against each other and the files named against the disk, reporting
    /// every problem (not only the first).
    fn validate(&self, p: &mut Problems) {
        let l = &self.limits;
        if l.max_connections == 0 {
            p.add("limits.max_connections", "must be at least 1".into());
        }
        if l.accept_rate > 0 && l.accept_burst == 0 {
            p.add("limits.accept_burst", "must be at least 1 when accept_rate paces connections".into());
        }
        if l.connect_timeout_secs == 0 || l.write_timeout_secs == 0 {
            p.add("limits.connect_timeout_secs / limits.write_timeout_secs", "must be at least 1 second".into());
        }
        if !(64..=268_435_455).contains(&l.max_packet_size) {
            p.add("limits.max_packet_size", format!("{} is outside 64..=268435455 bytes", l.max_packet_size));
        }
        if self.cluster.is_some() && l.max_packet_size > MAX_CLUSTERED_PACKET_SIZE {
            p.add(
                "limits.max_packet_size",
                format!(
                    "{} is over {MAX_CLUSTERED_PACKET_SIZE} bytes, the largest message a cluster's forwarding links carry",
                    l.max_packet_size
                ),
            );
        }
        if l.receive_maximum == 0 {
            p.add("limits.receive_maximum", "must be at least 1".into());
        }
        if l.max_inflight == 0 {
            p.add("limits.max_inflight", "must be at least 1".into());
        }
        if l.max_queued_messages == 0 || l.application_max_queued_messages == 0 {
            p.add("limits.max_queued_messages / limits.application_max_queued_messages", "must be at least 1".into());
        }
        if !(1..=65_535).contains(&l.max_topic_length) {
            p.add("limits.max_topic_length", format!("{} is outside 1..=65535", l.max_topic_length));
        }
        if l.max_topic_levels == 0 {
            p.add("limits.max_topic_levels", "must be at least 1".into());
        }
        if l.tcp_keepalive_secs > MAX_TCP_KEEPALIVE_SECS {
            p.add("limits.tcp_keepalive_secs", format!("{} is above {MAX_TCP_KEEPALIVE_SECS} seconds", l.tcp_keepalive_secs));
        }
        if l.tcp_keepalive_secs > 0 && !(1..=MAX_TCP_KEEPALIVE_SECS).contains(&l.tcp_keepalive_interval_secs) {
            p.add(
                "limits.tcp_keepalive_interval_secs",
                format!("{} is outside 1..={MAX_TCP_KEEPALIVE_SECS} seconds", l.tcp_keepalive_interval_secs),
            );
        }
        if l.password_checks_concurrent == 0 {
            p.add("limits.password_checks_concurrent", "must be at least 1".into());
        }
        if l.password_checks_per_source_per_minute > 0 && l.password_checks_burst == 0 {
            p.add("limits.password_checks_burst", "must be at least 1 while limits.password_checks_per_source_per_minute is not 0".into());
        }
        if l.max_retained_messages == 0 {
            p.add("limits.max_retained_messages", "must be at least 1".into());
        }
        if l.max_retained_bytes == 0 {
            p.add("limits.max_retained_bytes", "must be at least 1".into());
        }
        if l.max_retained_per_client == 0 {
            p.add("limits.max_retained_per_client", "must be at least 1".into());
        }
        if l.max_retained_bytes_per_client == 0 {
            p.add("limits.max_retained_bytes_per_client", "must be at least 1".into());
        }
        if let Some(path) = self.auth.state_file.as_ref().filter(|p| !p.is_file()) {
            p.add("auth.state_file", format!("{} is not a readable file", path.display()));
        }
        if let Some(path) = self.auth.http.ca_file.as_ref().filter(|p| !p.is_file()) {
            p.add("auth.http.ca_file", format!("{} is not a readable file", path.display()));
        }
        self.validate_cluster(p);
        if !self.any_listener_enabled() {
            p.add("listeners", "no listener is enabled; enable at least one of tcp, tls, ws, wss".into());
        }
        for (name, listener) in [("tls", &self.listeners.tls), ("wss", &self.listeners.wss)] {
            let Some(listener) = listener.as_ref().filter(|l| l.enabled) else { continue };
            let files = [("cert_file", &listener.cert_file), ("key_file", &listener.key_file)]
                .into_iter()
                .chain(listener.ca_file.iter().map(|f| ("ca_file", f)))
                .chain(listener.crl_files.iter().map(|f| ("crl_files", f)));
            for (key, path) in files {
                if !path.is_file() {
                    p.add(&format!("listeners.{name}.{key}"), format!("{} is not a readable file", path.display()));
                }
            }
            if listener.client_certificate != ClientCertificate::None && listener.ca_file.is_none() {
                p.add(&format!("listeners.{name}.ca_file"), "required when client_certificate is \"optional\" or \"required\"".into());
            }
            if let Err(reason) = IdentityRule::new(listener.identity_source, listener.identity_pattern.as_deref()) {
                p.add(&format!("listeners.{name}.identity_pattern"), reason);
            }
        }
    }

    /// Whether any MQTT listener is on (plain TCP is, unless its section turns it off).
    fn any_listener_enabled(&self) -> bool {
        let l = &self.listeners;
        let plain = [l.tcp.as_ref().is_none_or(|t| t.enabled), l.ws.as_ref().is_some_and(|w| w.enabled)];
        let secure = [&l.tls, &l.wss].map(|t| t.as_ref().is_some_and(|t| t.enabled));
        plain.into_iter().chain(secure).any(|on| on)
    }

    /// The enabled listeners with their addresses.
    pub fn listener_specs(&self) -> Vec<ListenerSpec> {
        let l = &self.listeners;
        let tcp_keepalive = (self.limits.tcp_keepalive_secs > 0).then(|| TcpKeepalive {
            time: Duration::from_secs(self.limits.tcp_keepalive_secs),
            interval: Duration::from_secs(self.limits.tcp_keepalive_interval_secs),
        });
        let default_tcp = PlainListener { enabled: true, bind: None };
        let tcp = Some(l.tcp.as_ref().unwrap_or(&default_tcp));
        let plain = [(ListenerKind::Tcp, tcp), (ListenerKind::Ws, l.ws.as_ref())]
            .into_iter()
            .filter_map(|(kind, p)| p.filter(|p| p.enabled).map(|p| (kind, p.bind, None)));
        let secure = [(ListenerKind::Tls, l.tls.as_ref()), (ListenerKind::Wss, l.wss.as_ref())]
            .into_iter()
            .filter_map(|(kind, t)| t.filter(|t| t.enabled).map(|t| (kind, t.bind, Some(tls_files(t)))));
        plain
            .chain(secure)
            .map(|(kind, bind, tls)| ListenerSpec {
                kind,
                bind: bind.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], kind.default_port()))),
                tls,
                tcp_keepalive,
            })
            .collect()
    }

    pub fn auth_policy(&self) -> AuthPolicy {
        let a = &self.auth;
        AuthPolicy {
            use_identity_as_username: a.use_identity_as_username,
            username_mismatch: a.username_mismatch,
            client_id_policy: a.client_id_policy,
            client_id_separator: a.client_id_separator,
        }
    }

    pub fn session_limits(&self) -> SessionLimits {
        let l = &self.limits;
        SessionLimits {
            max_packet_size: l.max_packet_size,
            receive_maximum: l.receive_maximum,
            max_inflight: l.max_inflight,
            topic_alias_maximum: l.topic_alias_maximum,
            max_keep_alive: l.max_keep_alive_secs,
            max_session_expiry: Duration::from_secs(l.max_session_expiry_secs),
            topics: TopicLimits { max_length: l.max_topic_length, max_levels: l.max_topic_levels },
            v3_unauthorized_publish: self.auth.v3_unauthorized_publish,
            max_subscriptions: l.max_subscriptions_per_session,
            max_retained_replay_bytes: l.max_retained_replay_bytes,
            max_outgoing_topic_aliases: l.max_outgoing_topic_aliases,
            shared_ack_timeout: Duration::from_millis(l.shared_ack_timeout_ms),
        }
    }

    /// The forwarding plane's sizing (cluster members only).
    pub fn broker_settings(&self) -> BrokerSettings {
        let l = &self.limits;
        BrokerSettings {
            max_queued_messages: l.max_queued_messages,
            application_max_queued_messages: l.application_max_queued_messages,
            slow_subscriber_timeout: Duration::from_millis(l.slow_subscriber_timeout_ms),
            takeover_timeout: Duration::from_secs(l.takeover_timeout_secs),
            max_sessions_per_identity: l.max_sessions_per_identity,
            max_anonymous_sessions: l.max_anonymous_sessions,
            client_ids: self.auth_policy(),
            retained: RetainedLimits {
                max_messages: l.max_retained_messages,
                max_bytes: l.max_retained_bytes,
                per_owner_messages: l.max_retained_per_client,
                per_owner_bytes: l.max_retained_bytes_per_client,
            },
        }
    }

    /// The password check gate: concurrency and per-source rate limit.
    pub fn password_gate(&self) -> PasswordGate {
        let l = &self.limits;
        PasswordGate::new(l.password_checks_concurrent, l.password_checks_per_source_per_minute, l.password_checks_burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config, or the first problem.
    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        parse_all(text, env).map_err(|e| e.0.into_iter().next().expect("never empty"))
    }

    fn parse_all(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::parse_with_env(text, "test.toml", Path::new("."), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    /// A temporary folder holding these (empty) files.
    fn dir_with(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for file in files {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        dir
    }

    fn keys(errors: &ConfigErrors) -> Vec<&str> {
        errors.0.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[log]
format = "xml"
[limits]
max_conections = 5
max_packet_size = "big"
password_checks_concurrent = 0
[listeners.tls]
cert_file = "missing.pem"
key_file = "missing.key"
[listeners.wss]
bind = "127.0.0.1:8084"
[auth]
state_file = "missing-auth.toml"
"#;
        let errors = parse_all(text, &[("RAMPART__LIMITS__MAX_CONNECTIONS", "0")]).unwrap_err();
        assert_eq!(
            keys(&errors),
            [
                "limits.max_conections",
                "limits.max_packet_size",
                "listeners.wss",
                "log.format",
                "limits.max_connections",
                "limits.password_checks_concurrent",
                "auth.state_file",
                "listeners.tls.cert_file",
                "listeners.tls.key_file",
            ],
            "{errors}"
        );
        assert!(errors.0.iter().all(|e| e.file == "test.toml"), "{errors}");
        assert!(errors.0[2].reason.contains("missing field `cert_file`"), "{errors}");
        assert_eq!(errors.to_string().lines().count(), 9, "one problem a line: {errors}");
        assert_eq!(errors.first().key, "limits.max_conections");
    }

    #[test]
    fn a_problem_already_reported_does_not_come_back_as_a_consequence() {
        // The tls section is unusable (no key_file) and tcp is off: "no listener" would only
        // repeat the tls problem.
        let errors = parse_all("[listeners.tcp]\nenabled = false\n[listeners.tls]\ncert_file = \"c.pem\"\n", &[]).unwrap_err();
        assert_eq!(keys(&errors), ["listeners.tls"], "{errors}");
        // Nothing left after a problem at the top level.
        let errors = parse_all("cluster = 5\nlimits = 3\n", &[]).unwrap_err();
        assert_eq!(keys(&errors), ["cluster", "limits"], "{errors}");
    }

    #[test]
    fn a_bad_identity_pattern_is_reported_not_a_panic() {
        let dir = dir_with(&["s.pem", "s.key", "ca.pem"]);
        let text = "[listeners.tls]\ncert_file = \"s.pem\"\nkey_file = \"s.key\"\nca_file = \"ca.pem\"\nclient_certificate = \"required\"\nidentity_pattern = \"(\"\n";
        let errors = Config::parse_with_env(text, "test.toml", dir.path(), []).unwrap_err();
        assert_eq!(keys(&errors), ["listeners.tls.identity_pattern"], "{errors}");
    }

    #[test]
    fn defaults() {
        let config = parse("", &[]).unwrap();
        let specs = config.listener_specs();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].kind, ListenerKind::Tcp);
        assert_eq!(specs[0].bind, "0.0.0.0:1883".parse().unwrap());
        assert_eq!(config.limits.max_queued_messages, 1000);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = parse("[limits]\nmax_conections = 5\n", &[]).unwrap_err();
        assert_eq!(err.file, "test.toml");
        assert_eq!(err.key, "limits.max_conections");
        assert!(err.reason.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = parse("[limits]\nmax_connections = \"many\"\n", &[]).unwrap_err();
        assert_eq!(err.key, "limits.max_connections");
        let err = parse("[limits]\nmax_packet_size = 10\n", &[]).unwrap_err();
        assert_eq!(err.key, "limits.max_packet_size");
        let err = parse("[listeners.tls]\ncert_file = \"missing.pem\"\nkey_file = \"missing.key\"\n", &[]).unwrap_err();
        assert_eq!(err.key, "listeners.tls.cert_file");
        let err = parse("[listeners.tls]\nbind = \"127.0.0.1:8883\"\n", &[]).unwrap_err();
        assert_eq!(err.key, "listeners.tls");
        assert!(err.reason.contains("cert_file"), "{err}");
    }

    #[test]
    fn no_listener_is_an_error() {
        let err = parse("[listeners.tcp]\nenabled = false\n", &[]).unwrap_err();
        assert_eq!(err.key, "listeners");
    }

    #[test]
    fn environment_overrides() {
        let config = parse(
            "[limits]\nmax_connections = 5\n",
            &[("RAMPART__LIMITS__MAX_CONNECTIONS", "7"), ("RAMPART__LISTENERS__TCP__BIND", "127.0.0.1:1999"), ("RAMPART_CONFIG", "x")],
        )
        .unwrap();
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(config.listener_specs()[0].bind, "127.0.0.1:1999".parse().unwrap());
        let err = parse("", &[("RAMPART__LIMITS__NOPE", "1")]).unwrap_err();
        assert_eq!(err.key, "limits.nope");
    }

    #[test]
    fn tcp_keepalive_reaches_every_listener_and_zero_turns_it_off() {
        let config = parse("[listeners.ws]\n", &[]).unwrap();
        let expected = TcpKeepalive { time: Duration::from_secs(60), interval: Duration::from_secs(10) };
        assert!(config.listener_specs().iter().all(|s| s.tcp_keepalive == Some(expected)));
        let config = parse("[limits]\ntcp_keepalive_secs = 0\ntcp_keepalive_interval_secs = 0\n", &[]).unwrap();
        assert_eq!(config.listener_specs()[0].tcp_keepalive, None);
        let err = parse("[limits]\ntcp_keepalive_interval_secs = 0\n", &[]).unwrap_err();
        assert_eq!(err.key, "limits.tcp_keepalive_interval_secs");
        let err = parse("[limits]\ntcp_keepalive_secs = 40000\n", &[]).unwrap_err();
        assert_eq!(err.key, "limits.tcp_keepalive_secs");
    }

    #[test]
    fn password_and_retained_limits_are_checked() {
        for (text, key) in [
            ("[limits]\npassword_checks_concurrent = 0\n", "limits.password_checks_concurrent"),
            ("[limits]\npassword_checks_burst = 0\n", "limits.password_checks_burst"),
            ("[limits]\nmax_retained_messages = 0\n", "limits.max_retained_messages"),
            ("[limits]\nmax_retained_bytes = 0\n", "limits.max_retained_bytes"),
            ("[limits]\nmax_retained_per_client = 0\n", "limits.max_retained_per_client"),
            ("[limits]\nmax_retained_bytes_per_client = 0\n", "limits.max_retained_bytes_per_client"),
            ("[limits]\npassword_checks_per_source_per_minute = -1\n", "limits.password_checks_per_source_per_minute"),
        ] {
            let err = parse(text, &[]).unwrap_err();
            assert_eq!(err.key, key, "{text}");
            assert_eq!(err.file, "test.toml");
        }
        let config = parse("[limits]\npassword_checks_per_source_per_minute = 0\npassword_checks_burst = 0\n", &[]).unwrap();
        assert_eq!(config.limits.password_checks_per_source_per_minute, 0);
        let text = "[limits]\nmax_retained_messages = 5\nmax_retained_bytes = 100\nmax_retained_per_client = 2\nmax_retained_bytes_per_client = 50\n";
        let settings = parse(text, &[]).unwrap().broker_settings();
        assert_eq!(settings.retained, RetainedLimits { max_messages: 5, max_bytes: 100, per_owner_messages: 2, per_owner_bytes: 50 });
    }

    #[test]
    fn node_id_from_hostname_takes_the_ordinal_plus_one() {
        for (name, id) in [("rampart-0", 1), ("rampart-2", 3), ("rampart-12.rampart-headless.mqtt.svc", 13), ("my-broker-7", 8)] {
            assert_eq!(node_id_from_hostname(name), Ok(id), "{name}");
        }
        for name in ["rampart", "rampart-", "rampart-x", "rampart-+1", "", "rampart.0", "rampart-18446744073709551615"] {
            assert!(node_id_from_hostname(name).is_err(), "{name}");
        }
    }

    #[test]
    fn cluster_node_id_comes_from_the_hostname_when_asked() {
        let dir = dir_with(&["node.pem", "node.key", "ca.pem"]);
        let cluster = "[cluster]\ncert_file = \"node.pem\"\nkey_file = \"node.key\"\nca_file = \"ca.pem\"\n";
        let load = |text: &str, env: &[(&str, &str)], host: &str| {
            let host = host.to_string();
            Config::parse_with_env_and_hostname(
                text,
                "test.toml",
                dir.path(),
                env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
                move || Ok(host),
            )
        };
        let from_host = format!("{cluster}node_id_from_hostname = true\n");
        assert_eq!(load(&from_host, &[], "rampart-1").unwrap().cluster.unwrap().node_id, 2);
        let env = [("RAMPART__CLUSTER__NODE_ID_FROM_HOSTNAME", "true")];
        assert_eq!(load(cluster, &env, "rampart-0").unwrap().cluster.unwrap().node_id, 1);
        assert_eq!(load(&format!("{cluster}node_id = 5\n"), &[], "rampart-0").unwrap().cluster.unwrap().node_id, 5);

        let first = |result: Result<Config, ConfigErrors>| result.unwrap_err().0.remove(0);
        let err = first(load(&from_host, &[], "buildhost"));
        assert_eq!(err.key, "cluster.node_id_from_hostname");
        assert!(err.reason.contains("\"buildhost\" does not end in -<ordinal>"), "{err}");
        let err = first(load(&format!("{from_host}node_id = 2\n"), &[], "rampart-0"));
        assert_eq!(err.key, "cluster.node_id");
        let err = first(load(cluster, &[], "rampart-0"));
        assert_eq!(err.key, "cluster.node_id");
        assert!(err.reason.contains("node_id_from_hostname"), "{err}");
        let failing =
            Config::parse_with_env_and_hostname(&from_host, "test.toml", dir.path(), [], || Err(std::io::Error::other("no uts namespace")));
        assert_eq!(keys(&failing.unwrap_err()), ["cluster.node_id_from_hostname"], "reported once, not again as a missing node_id");

        // A clustered node's packets must fit in one frame of a forwarding link.
        let clustered = |size: usize| load(&format!("[limits]\nmax_packet_size = {size}\n{cluster}node_id = 1\n"), &[], "h");
        assert!(clustered(MAX_CLUSTERED_PACKET_SIZE).is_ok());
        let err = first(clustered(MAX_CLUSTERED_PACKET_SIZE + 1));
        assert_eq!(err.key, "limits.max_packet_size");
        assert!(err.reason.contains("forwarding links"), "{err}");
        assert!(parse(&format!("[limits]\nmax_packet_size = {}\n", MAX_CLUSTERED_PACKET_SIZE + 1), &[]).is_ok(), "standalone");
    }

    #[test]
    fn the_system_hostname_is_read() {
        let name = system_hostname().unwrap();
        assert!(!name.is_empty() && !name.contains('\0'), "{name:?}");
    }

    #[test]
    fn the_command_lines_own_variables_are_not_overrides() {
        let cli = [
            ("RAMPART_ADMIN_ENDPOINT", "https://localhost:9443"),
            ("RAMPART_ADMIN_CA", "ca.pem"),
            ("RAMPART_ADMIN_CERT", "admin.pem"),
            ("RAMPART_ADMIN_KEY", "admin.key"),
            ("RAMPART_PKI_DIR", "pki"),
            ("RAMPART_LIMITS__MAX_CONNECTIONS", "7"),
        ];
        let config = parse("[limits]\nmax_connections = 5\n", &cli).unwrap();
        assert_eq!(config.limits.max_connections, 5);
    }
}
