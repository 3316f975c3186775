//! Test harness: runs the real `rampart` binary on free loopback ports and stops it on drop.

#![allow(dead_code)]

pub mod mosquitto;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A broker process started for one test.
pub struct Broker {
    child: Child,
    pub dir: tempfile::TempDir,
    pub tcp: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// Log lines the broker printed (collected in the background).
    pub logs: mpsc::Receiver<String>,
}

/// Options for [`Broker::start`].
#[derive(Default)]
pub struct Options {
    /// Extra TOML appended to the `[limits]` section.
    pub limits: &'static str,
    /// Also start TLS, WS and WSS listeners (with a generated development PKI).
    pub all_listeners: bool,
}

/// The `rampart` binary as a command that inherits none of the caller's `RAMPART_*` variables
/// (an operator's shell after the README sets some): a test sees only the configuration it gives.
pub fn rampart() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rampart"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RAMPART_") {
            command.env_remove(name);
        }
    }
    command
}

impl Broker {
    /// Starts a broker with plain TCP, HTTP and the extra `listeners` (TOML sections), waiting
    /// for `extra_listeners` more bound listeners.
    pub fn start_with(listeners: &str, extra_listeners: usize) -> Broker {
        Broker::launch(tempfile::tempdir().expect("temp dir"), listeners, 2 + extra_listeners)
    }

    pub fn start(options: Options) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut extra = String::new();
        if options.all_listeners {
            rampart_node::tls::install_crypto_provider();
            let pki = rampart_node::pki::ensure_dev_pki(dir.path(), 0).expect("dev pki");
            for section in ["tls", "wss"] {
                extra.push_str(&format!(
                    "[listeners.{section}]\nbind = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
                    pki.server_cert, pki.server_key
                ));
            }
            extra.push_str("[listeners.ws]\nbind = \"127.0.0.1:0\"\n");
        }
        extra.push_str(&format!("[limits]\n{}\n", options.limits));
        Broker::launch(dir, &extra, if options.all_listeners { 5 } else { 2 })
    }

    fn launch(dir: tempfile::TempDir, extra_config: &str, wanted: usize) -> Broker {
        let config = format!(
            "[log]\nlevel = \"info,rampart_node=debug\"\n[http]\nbind = \"127.0.0.1:0\"\n[listeners.tcp]\nbind = \"127.0.0.1:0\"\n{extra_config}"
        );
        let path = dir.path().join("rampart.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = rampart()
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rampart");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut broker = Broker { child, dir, tcp: None, tls: None, ws: None, wss: None, http: None, logs: rx };
        let mut found = 0;
        while found < wanted {
            let line = broker
                .logs
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("broker did not start; found {found} of {wanted} listeners"));
            let Some(addr) = field(&line, "addr=") else { continue };
            let addr: SocketAddr = addr.parse().expect("address");
            if line.contains("metrics and health") {
                broker.http = Some(addr);
            } else if let Some(kind) = field(&line, "listener=") {
                match kind.trim_matches('"') {
                    "tcp" => broker.tcp = Some(addr),
                    "tls" => broker.tls = Some(addr),
                    "ws" => broker.ws = Some(addr),
                    "wss" => broker.wss = Some(addr),
                    _ => continue,
                }
            } else {
                continue;
            }
            found += 1;
        }
        broker
    }

    pub fn tcp_port(&self) -> u16 {
        self.tcp.expect("tcp listener").port()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until a log line containing `needle` appears.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.logs.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Fetches an HTTP path from the metrics endpoint.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.http.expect("http endpoint")).expect("connect http");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    }

    /// The value of an unlabelled or labelled metric line, e.g. `rampart_connections` or
    /// `rampart_messages_dropped_total{reason="queue_full"}`.
    pub fn metric(&self, series: &str) -> i64 {
        let text = self.http_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {series} not found in:\n{text}"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `key` up to the next space, ANSI escapes removed.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find([' ', '\x1b']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn tcp(addr: SocketAddr) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

/// Runs a command to completion, killing it after `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> std::process::Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start command");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("command output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("command did not finish within {timeout:?}: {command:?}");
        }
    }
}

/// A byte stream: TCP, or TLS over TCP.
pub trait Stream: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Stream for T {}

/// A blocking MQTT client on a raw socket, for sending exact bytes and reading exact answers.
pub struct Raw {
    pub stream: Box<dyn Stream>,
    pub version: rampart_node::mqtt::codec::ProtocolVersion,
    input: bytes::BytesMut,
}

impl Raw {
    /// Connects the socket without sending anything.
    pub fn socket(addr: SocketAddr, version: rampart_node::mqtt::codec::ProtocolVersion) -> Raw {
        Raw { stream: Box::new(tcp(addr)), version, input: bytes::BytesMut::new() }
    }

    /// A TLS connection to `localhost` trusting `ca`, presenting the client certificate `identity` (cert, key).
    pub fn tls(addr: SocketAddr, version: rampart_node::mqtt::codec::ProtocolVersion, ca: &Path, identity: (&Path, &Path)) -> Raw {
        use rustls::pki_types::pem::PemObject;
        rampart_node::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rampart_node::tls::load_certs(ca).expect("ca"));
        let chain = rampart_node::tls::load_certs(identity.0).expect("client certificate");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(identity.1).expect("client key");
        let config =
            rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key).expect("client config");
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("tls client");
        Raw { stream: Box::new(rustls::StreamOwned::new(connection, tcp(addr))), version, input: bytes::BytesMut::new() }
    }

    /// Connects and completes CONNECT/CONNACK with a clean session.
    pub fn connect(addr: SocketAddr, version: rampart_node::mqtt::codec::ProtocolVersion, client_id: &str) -> Raw {
        let mut raw = Raw::socket(addr, version);
        raw.handshake(client_id);
        raw
    }

    /// Sends CONNECT with a clean session and asserts a successful CONNACK.
    pub fn handshake(&mut self, client_id: &str) {
        let code = self.connack(client_id);
        assert_eq!(code, mqttbytes::v5::ConnectReturnCode::Success, "CONNACK for {client_id}");
    }

    /// Sends CONNECT with a clean session and returns the CONNACK code.
    pub fn connack(&mut self, client_id: &str) -> mqttbytes::v5::ConnectReturnCode {
        self.connack_with(mqttbytes::v5::Connect::new(client_id))
    }

    /// Sends `connect` and returns the CONNACK code.
    pub fn connack_with(&mut self, connect: mqttbytes::v5::Connect) -> mqttbytes::v5::ConnectReturnCode {
        self.send_packet(&rampart_node::mqtt::codec::Packet::Connect(connect));
        match self.recv() {
            Some(rampart_node::mqtt::codec::Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send_packet(&mut self, packet: &rampart_node::mqtt::codec::Packet) {
        let mut out = bytes::BytesMut::new();
        rampart_node::mqtt::codec::encode(self.version, packet, &mut out, None).expect("encode");
        self.send(&out);
    }

    /// The next packet, or `None` when the broker closed the connection.
    pub fn recv(&mut self) -> Option<rampart_node::mqtt::codec::Packet> {
        self.next_packet().unwrap_or_else(|e| panic!("read failed: {e}"))
    }

    /// The next packet if one comes within the socket's read timeout (5 s); `None` when none
    /// came (the connection stays usable) or the broker closed the connection.
    pub fn recv_if_any(&mut self) -> Option<rampart_node::mqtt::codec::Packet> {
        match self.next_packet() {
            Ok(packet) => packet,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    fn next_packet(&mut self) -> std::io::Result<Option<rampart_node::mqtt::codec::Packet>> {
        use std::io::Read;
        loop {
            let decoded = rampart_node::mqtt::codec::decode(self.version, &mut self.input, usize::MAX);
            if let Some(packet) = decoded.expect("broker sent a valid packet") {
                return Ok(Some(packet));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Asserts the broker closes the connection, after at most an MQTT 5 DISCONNECT with `reason`.
    pub fn expect_close(&mut self, reason: Option<mqttbytes::v5::DisconnectReasonCode>) {
        match (self.recv(), reason) {
            (None, None) => {}
            (Some(rampart_node::mqtt::codec::Packet::Disconnect(d)), Some(reason)) => {
                assert_eq!(d.reason_code, reason);
                assert!(self.recv().is_none(), "connection still open after DISCONNECT");
            }
            (other, _) => panic!("expected close with {reason:?}, got {other:?}"),
        }
    }
}

impl Broker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the broker process to exit by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for broker") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Raw {
    /// The exact bytes of the next packet, fixed header included, or `None` when the broker
    /// closed the connection.
    pub fn recv_frame(&mut self) -> Option<Vec<u8>> {
        use std::io::Read;
        loop {
            if let Some(total) = frame_len(&self.input) {
                return Some(self.input.split_to(total).to_vec());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof) => return None,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!("the broker neither answered nor closed within the read timeout (buffered: {:02x?})", &self.input[..])
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }
}

/// The length of the first packet in `buf` (fixed header included), once all of it is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 2 + i + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}
