//! Accept loops for the TCP, TLS, WebSocket and secure WebSocket listeners: connection limit,
//! TCP_NODELAY and TCP keepalive, TLS and WebSocket handshakes with a deadline, then hand-off to the connection driver.

pub mod connection;
pub mod pacing;
pub mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::auth::identity::IdentityRule;
use crate::auth::policy::PeerAuth;
use crate::auth::store::AuthStore;
use crate::config::{ListenerKind, ListenerSpec, TlsFiles};
use crate::telemetry::metrics;
use crate::tls::revocation::{self, RefusedRevoked};
use connection::ConnectionContext;
use pacing::AcceptPacer;

/// A listener bound to its address, not yet accepting.
pub struct BoundListener {
    pub kind: ListenerKind,
    pub local_addr: SocketAddr,
    socket: TcpListener,
    /// The TLS configuration in force, swapped on reload (new handshakes use the new one).
    pub tls: Option<Arc<ArcSwap<ServerConfig>>>,
    /// What the TLS configuration is built from.
    pub tls_files: Option<TlsFiles>,
    /// How client certificates become identities, when clients are asked for one.
    identity: Option<Arc<IdentityRule>>,
    /// TCP keepalive set on every accepted socket; `None`: off.
    tcp_keepalive: Option<TcpKeepalive>,
}

/// Binds every listener; fails naming the listener and address, or the TLS file at fault. TLS
/// handshakes refuse certificates that `auth` holds revoked.
pub async fn bind(specs: &[ListenerSpec], auth: &Arc<AuthStore>) -> anyhow::Result<Vec<BoundListener>> {
    let mut bound = Vec::with_capacity(specs.len());
    for spec in specs {
        let tls = match &spec.tls {
            Some(files) => Some(Arc::new(ArcSwap::new(crate::tls::server_config(files, auth)?))),
            None => None,
        };
        let identity = spec.tls.as_ref().and_then(|t| t.client_auth.as_ref()).map(|c| Arc::new(c.identity.clone()));
        let socket = TcpListener::bind(spec.bind)
            .await
            .map_err(|e| anyhow::anyhow!("listener {} cannot bind {}: {e}", spec.kind.name(), spec.bind))?;
        let tcp_keepalive = spec.tcp_keepalive.map(|k| TcpKeepalive::new().with_time(k.time).with_interval(k.interval));
        bound.push(BoundListener {
            kind: spec.kind,
            local_addr: socket.local_addr()?,
            socket,
            tls,
            tls_files: spec.tls.clone(),
            identity,
            tcp_keepalive,
        });
    }
    Ok(bound)
}

/// Connections past the limit that may wait at once for their CONNECT, to be told "busy".
const MAX_BUSY_REPLIES: usize = 64;

/// Accepts connections until the node shuts down. `slots` bounds open connections across all
/// listeners; a client past the limit gets CONNACK "server unavailable" (3.1.1) / "server busy"
/// (5), or, when too many such replies are pending already, an immediate close. With a `pacer`,
/// a connection past its rate waits for its turn before its handshake starts, and the next one
/// is not accepted meanwhile (it waits in the kernel's accept queue).
pub async fn run(listener: BoundListener, ctx: Arc<ConnectionContext>, slots: Arc<Semaphore>, pacer: Option<Arc<AcceptPacer>>) {
    let busy_replies = Arc::new(Semaphore::new(MAX_BUSY_REPLIES));
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.socket.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(listener = listener.kind.name(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(wait) = pacer.as_ref().map(|p| p.turn(std::time::Instant::now())).filter(|w| !w.is_zero()) {
            metrics::connection_deferred();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
        tune(&tcp, listener.tcp_keepalive.as_ref(), peer, listener.kind);
        let ctx = ctx.clone();
        let kind = listener.kind;
        let tls = listener.tls.as_ref().map(|config| TlsAcceptor::from(config.load_full()));
        let identity = listener.identity.clone();
        let (permit, busy) = match slots.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match busy_replies.clone().try_acquire_owned() {
                Ok(permit) => (permit, true),
                Err(_) => {
                    tracing::warn!(%peer, listener = kind.name(), "connection limit reached; closing");
                    metrics::connection_refused();
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            handle(Accepted { kind, tcp, peer, tls, identity, ctx, busy }).await;
            drop(permit);
        });
    }
}

/// TCP_NODELAY and, when configured, TCP keepalive on an accepted socket (failures are logged).
fn tune(tcp: &TcpStream, keepalive: Option<&TcpKeepalive>, peer: SocketAddr, kind: ListenerKind) {
    let _ = tcp.set_nodelay(true);
    if let Some(keepalive) = keepalive {
        if let Err(e) = SockRef::from(tcp).set_tcp_keepalive(keepalive) {
            tracing::debug!(%peer, listener = kind.name(), error = %e, "TCP keepalive not set");
        }
    }
}

/// A client connection to run once its transport is established.
type Connection = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An accepted socket and what its listener does with it.
struct Accepted {
    kind: ListenerKind,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    identity: Option<Arc<IdentityRule>>,
    ctx: Arc<ConnectionContext>,
    /// Past the connection limit: only the "busy" answer.
    busy: bool,
}

async fn handle(accepted: Accepted) {
    // The handshakes run boxed and are over before the connection runs, so the task of a
    // connection holds neither their state nor room for another transport's.
    if let Some(connection) = Box::pin(transport(accepted)).await {
        connection.await;
    }
}

/// Completes the transport's handshakes (TLS, WebSocket) within the connect timeout; `None`
/// when one failed (logged and counted).
async fn transport(Accepted { kind, tcp, peer, tls, identity, ctx, busy }: Accepted) -> Option<Connection> {
    let deadline = ctx.connect_timeout;
    let max_message = ctx.limits.max_packet_size;
    let failed = |reason: &str| {
        handshake_failed(peer, kind, reason);
        None
    };
    match (kind, tls) {
        (ListenerKind::Tcp, _) => Some(mqtt(tcp, peer, PeerAuth::Anonymous, ctx, busy, kind)),
        (ListenerKind::Ws, _) => match tokio::time::timeout(deadline, websocket::accept(tcp, max_message)).await {
            Ok(Ok(ws)) => Some(mqtt(ws, peer, PeerAuth::Anonymous, ctx, busy, kind)),
            Ok(Err(e)) => failed(&e.to_string()),
            Err(_) => failed("WebSocket handshake timed out"),
        },
        (ListenerKind::Tls | ListenerKind::Wss, Some(acceptor)) => {
            let tls_stream = match tokio::time::timeout(deadline, revocation::watch(acceptor.accept(tcp))).await {
                Ok((Ok(stream), _)) => stream,
                Ok((Err(e), Some(refused))) => {
                    handshake_revoked(peer, kind, &e.to_string(), refused);
                    return None;
                }
                Ok((Err(e), None)) => return failed(&e.to_string()),
                Err(_) => return failed("TLS handshake timed out"),
            };
            let peer_auth = identity.map_or(PeerAuth::Anonymous, |rule| peer_auth(tls_stream.get_ref().1, &rule));
            if kind == ListenerKind::Tls {
                return Some(mqtt(tls_stream, peer, peer_auth, ctx, busy, kind));
            }
            match tokio::time::timeout(deadline, websocket::accept(tls_stream, max_message)).await {
                Ok(Ok(ws)) => Some(mqtt(ws, peer, peer_auth, ctx, busy, kind)),
                Ok(Err(e)) => failed(&e.to_string()),
                Err(_) => failed("WebSocket handshake timed out"),
            }
        }
        (ListenerKind::Tls | ListenerKind::Wss, None) => failed("listener has no TLS configuration"),
    }
}

/// The identity of the client certificate a TLS client presented, if any.
fn peer_auth(connection: &rustls::ServerConnection, rule: &IdentityRule) -> PeerAuth {
    match connection.peer_certificates().and_then(|chain| chain.first()) {
        None => PeerAuth::Anonymous,
        Some(leaf) => match rule.extract(leaf) {
            Ok(cert) => PeerAuth::Certificate(cert),
            Err(e) => PeerAuth::Rejected(e.to_string()),
        },
    }
}

/// MQTT on an established stream: a session, or only the "busy" answer past the limit.
fn mqtt<S>(stream: S, peer: SocketAddr, peer_auth: PeerAuth, ctx: Arc<ConnectionContext>, busy: bool, kind: ListenerKind) -> Connection
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if busy {
        Box::pin(async move { connection::refuse_busy(stream, peer, &ctx).await })
    } else {
        Box::pin(connection::serve(stream, peer, peer_auth, ctx, kind.name()))
    }
}

fn handshake_failed(peer: SocketAddr, kind: ListenerKind, reason: &str) {
    metrics::connection_refused();
    tracing::info!(%peer, listener = kind.name(), reason, "handshake failed");
}

/// A log line budget: at most `per_second` lines a second.
struct LineBudget {
    per_second: u32,
    /// (start of the current second, lines logged in it, lines left out since the last one logged).
    state: std::sync::Mutex<Option<(std::time::Instant, u32, u64)>>,
}

impl LineBudget {
    const fn new(per_second: u32) -> LineBudget {
        LineBudget { per_second, state: std::sync::Mutex::new(None) }
    }

    /// Whether a line may be logged at `now`: the number of lines left out since the last one
    /// logged, or `None` (this one is left out and counted).
    fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (second, lines, left_out) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*second) >= std::time::Duration::from_secs(1) {
            (*second, *lines) = (now, 0);
        }
        if *lines >= self.per_second {
            *left_out += 1;
            return None;
        }
        *lines += 1;
        Some(std::mem::take(left_out))
    }
}

/// Refused-as-revoked handshakes logged per second at most: a fleet revoked at once keeps
/// reconnecting. The others are counted (`rampart_tls_handshakes_revoked_total`) and their
/// number is given on the next line logged (`suppressed=N`).
static REVOKED_LINES: LineBudget = LineBudget::new(10);

/// Logs a handshake refused because the client certificate is revoked: the peer, the
/// certificate and the revocation rule, in one line.
fn handshake_revoked(peer: SocketAddr, kind: ListenerKind, reason: &str, refused: RefusedRevoked) {
    metrics::connection_refused();
    let Some(suppressed) = REVOKED_LINES.admit(std::time::Instant::now()) else { return };
    let RefusedRevoked { identity, revoked } = refused;
    tracing::warn!(
        %peer,
        listener = kind.name(),
        reason,
        identity,
        serial = revoked.serial,
        issuer = revoked.issuer,
        revoked_by = %revoked.by,
        suppressed,
        "handshake failed"
    );
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_revoked_handshake_lines_are_limited_per_second_and_count_what_they_leave_out() {
        let budget = LineBudget::new(3);
        let start = std::time::Instant::now();
        let admitted: Vec<_> = (0..5).map(|_| budget.admit(start)).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None]);
        assert_eq!(budget.admit(start + std::time::Duration::from_millis(999)), None);
        let next_second = start + std::time::Duration::from_secs(1);
        assert_eq!(budget.admit(next_second), Some(3), "the first line of the next second says how many were left out");
        assert_eq!(budget.admit(next_second), Some(0));
    }

    /// What an idle connection's task keeps: the dispatch (a pointer to its connection) and the
    /// pump's state; the handshakes, the CONNECT exchange and the closing live in their own
    /// short-lived allocations. Before they were split out, 3.5 KiB and 6.4 KiB (issue 23).
    #[test]
    fn an_idle_connection_keeps_only_small_futures() {
        fn output_size<A, R>(_: fn(A) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        fn serve_size<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        let handle = output_size(handle);
        let serve = serve_size(connection::serve::<tokio_rustls::server::TlsStream<TcpStream>>);
        assert!(handle <= 256, "the task of a connection holds {handle} bytes");
        assert!(serve <= 3 * 1024, "a TLS connection's pump holds {serve} bytes");
    }
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn tcp_option(tcp: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and an int-sized buffer whose length is passed along.
        let rc = unsafe { libc::getsockopt(tcp.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        value
    }

    async fn accepted_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (listener.accept().await.unwrap().0, client)
    }

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_and_the_configured_keepalive() {
        let (accepted, _client) = accepted_pair().await;
        let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(42)).with_interval(Duration::from_secs(7));
        tune(&accepted, Some(&keepalive), accepted.peer_addr().unwrap(), ListenerKind::Tcp);
        assert!(accepted.nodelay().unwrap());
        assert_eq!(tcp_option(&accepted, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(tcp_option(&accepted, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 42);
        assert_eq!(tcp_option(&accepted, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 7);

        let (accepted, _client) = accepted_pair().await;
        tune(&accepted, None, accepted.peer_addr().unwrap(), ListenerKind::Tcp);
        assert_eq!(tcp_option(&accepted, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
    }
}
