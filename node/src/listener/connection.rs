//! The IO driver of one client connection: reads the CONNECT, claims the session, then runs the
//! [`Session`] state machine against the socket and the session's mailbox until the connection
//! ends. All protocol decisions are the session's; this file only moves bytes and runs actions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v5::{self, DisconnectReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::auth::policy::{self, AuthPolicy, PeerAuth};
use crate::auth::state::ClientType;
use crate::auth::store::AuthStore;
use crate::broker::message::Delivery;
use crate::broker::persist::StoredSession;
use crate::broker::Broker;
use crate::listener::clients::{ClientInfo, ConnectedClients};
use crate::mqtt::codec::{self, DecodeError, Packet, ProtocolVersion};
use crate::mqtt::connect::{self, SessionLimits};
use crate::mqtt::session::{Action, RetainHandling, Session};
use crate::telemetry::metrics;

/// Everything a connection needs from the node.
pub struct ConnectionContext {
    pub broker: Arc<Broker>,
    pub limits: SessionLimits,
    pub auth: AuthPolicy,
    /// Credentials, permissions and revocations in force.
    pub auth_store: Arc<AuthStore>,
    /// Who is connected here, for the admin API.
    pub clients: Arc<ConnectedClients>,
    /// Time allowed from accept to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Time a write may make no progress before the client is dropped.
    pub write_timeout: Duration,
    /// Flips to true when the node shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Initial size of a connection's read buffer; it grows for larger packets. Kept small because
/// most connections are idle devices.
const INITIAL_READ_BUFFER: usize = 1024;

/// Largest batch of queued messages written per wake-up, so one busy client cannot starve its own reads.
const MAX_DELIVERIES_PER_BATCH: usize = 1024;

/// Serves one client connection to completion.
pub async fn serve<S>(stream: S, peer: SocketAddr, peer_auth: PeerAuth, ctx: Arc<ConnectionContext>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut input = BytesMut::with_capacity(INITIAL_READ_BUFFER);
    let connect = tokio::time::timeout(ctx.connect_timeout, read_connect(&mut reader, &mut input, ctx.limits.max_packet_size)).await;
    let (version, connect) = match connect {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return refused(peer, "closed before CONNECT"),
        Ok(Err(ConnectError::Decode(DecodeError::UnsupportedVersion(level)))) => {
            write_refusal(&mut writer, ProtocolVersion::V311, v5::ConnectReturnCode::UnsupportedProtocolVersion).await;
            return refused(peer, &format!("unsupported protocol level {level}"));
        }
        Ok(Err(e)) => return refused(peer, &e.to_string()),
        Err(_) => return refused(peer, &format!("no CONNECT within {:?}", ctx.connect_timeout)),
    };
    let broker = &ctx.broker;
    let validated = connect::validate(version, connect, &ctx.limits, || format!("rampart-{}", broker.registry.new_session_id()));
    let (request, principal, grant) = match authorize(validated, &peer_auth, &ctx).await {
        Ok(accepted) => accepted,
        Err(refusal) => {
            write_refusal(&mut writer, version, refusal.code).await;
            return refused(peer, &refusal.reason);
        }
    };
    let (mut claim, mut record) = match broker.registry.claim(&request.client_id, broker.settings.takeover_timeout).await {
        Ok(claimed) => claimed,
        Err(e) => {
            write_refusal(&mut writer, version, v5::ConnectReturnCode::ServerBusy).await;
            return refused(peer, &e.to_string());
        }
    };
    let now = Instant::now();
    let (discarded, present) = broker.registry.start(&mut record, request.clean_start, now);
    if let Some(old) = discarded {
        broker.end_session(&request.client_id, old);
    }
    record.durable = grant.client_type == ClientType::Application;
    let client_id = request.client_id.clone();
    let identity = principal.identity.as_deref().unwrap_or("-");
    tracing::info!(%peer, %client_id, %identity, ?version, clean_start = request.clean_start, session_present = present, "client connected");
    metrics::connection_opened();
    let mailbox = record.mailbox.clone();
    mailbox.set_capacity(grant.max_queued_messages.unwrap_or(match grant.client_type {
        ClientType::Device => broker.settings.max_queued_messages,
        ClientType::Application => broker.settings.application_max_queued_messages,
    }));
    let cert = principal.certificate.as_ref();
    let mut registration = ctx.clients.register(ClientInfo {
        client_id: client_id.clone(),
        identity: principal.identity.clone().or(principal.username.clone()).unwrap_or_default(),
        client_type: grant.client_type,
        credential: grant.credential.clone().unwrap_or_default(),
        cert_serial: cert.map(|c| c.serial.clone()).unwrap_or_default(),
        cert_issuer: cert.map(|c| c.issuer.clone()).unwrap_or_default(),
        cert_not_after: cert.map_or(0, |c| c.not_after),
        connected_at: crate::cluster::unix_now(),
        peer: peer.to_string(),
    });
    let mut session = Session::start(request, record, present, ctx.limits.clone(), grant.acl, now);
    let mut shutdown = ctx.shutdown.clone();
    let mut auth_changes = ctx.auth_store.changes();

    loop {
        run_actions(&mut session, broker).await;
        if session.close_reason().is_none() {
            fill_from_queues(&mut session, &mailbox);
        }
        if !session.output().is_empty() {
            let written = tokio::time::timeout(ctx.write_timeout, write_flush(&mut writer, session.output())).await;
            session.output().clear();
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => session.lost(format!("write failed: {e}")),
                Err(_) => session.lost(format!("write made no progress for {:?}", ctx.write_timeout)),
            }
        }
        if session.close_reason().is_some() {
            break;
        }
        let deadline = session.deadline().map(tokio::time::Instant::from_std);
        input.reserve(INITIAL_READ_BUFFER);
        tokio::select! {
            read = reader.read_buf(&mut input) => match read {
                Ok(0) => session.lost("connection closed by client without DISCONNECT"),
                Ok(_) => session.handle_input(&mut input, Instant::now()),
                Err(e) => session.lost(format!("read failed: {e}")),
            },
            _ = mailbox.readable(), if session.can_send() => {}
            _ = sleep_until(deadline) => session.tick(Instant::now()),
            _ = claim.taken_over.changed() => session.kick(DisconnectReasonCode::SessionTakenOver, "another connection took over this client id"),
            _ = shutdown.changed() => session.kick(DisconnectReasonCode::ServerShuttingDown, "broker shutting down"),
            _ = auth_changes.changed() => match ctx.auth_store.authorize(&principal, session.client_id()) {
                Ok(grant) => session.set_acl(grant.acl),
                Err(refusal) => session.kick(DisconnectReasonCode::AdministrativeAction, refusal.reason),
            },
            _ = registration.kicked.changed() => {
                let reason = registration.kicked.borrow_and_update().clone().unwrap_or_default();
                session.kick(DisconnectReasonCode::AdministrativeAction, format!("disconnected by an administrator: {reason}"));
            }
        }
    }

    drop(registration);
    let close = session.close_reason().cloned();
    let reconnected = claim.reconnect_watch();
    let (record, will) = session.finish();
    if let Some(close) = &close {
        tracing::info!(%peer, %client_id, reason = ?close.reason, detail = %close.detail, "client disconnected");
    }
    metrics::connection_closed();
    if let Some(will) = will {
        let broker = broker.clone();
        let delay = will.delay.min(record.expiry);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if delay.is_zero() || !reconnected.reconnected() {
                broker.publish(Arc::new(will.into_message(Instant::now()))).await;
            }
        });
    }
    let stored = record.durable.then(|| StoredSession::capture(&record));
    if let Some(ended) = broker.registry.release(claim, record, Instant::now()) {
        broker.end_session(&client_id, ended);
    } else if let Some(stored) = stored {
        broker.session_offline(&client_id, &stored);
    }
    // Only now, with the session offline (or ended), does the client see the close.
    let _ = writer.shutdown().await;
}

/// Authenticates and authorizes a validated CONNECT: certificate identity, else user name and
/// password (checked on a blocking thread: argon2id is slow by design), else anonymous.
async fn authorize(
    validated: Result<connect::ConnectRequest, connect::Refusal>,
    peer_auth: &PeerAuth,
    ctx: &ConnectionContext,
) -> Result<(connect::ConnectRequest, policy::Principal, crate::auth::index::Grant), connect::Refusal> {
    let mut request = validated?;
    let mut principal = policy::authenticate(peer_auth, &mut request, &ctx.auth)?;
    let index = ctx.auth_store.current();
    if let (None, Some(username)) = (&principal.certificate, request.username.clone()) {
        let (checker, password) = (index.clone(), request.password.clone());
        principal.password_verified =
            tokio::task::spawn_blocking(move || checker.check_password(&username, password.as_deref())).await.map_err(|e| {
                connect::Refusal { code: v5::ConnectReturnCode::ServerUnavailable, reason: format!("password check failed: {e}") }
            })??;
    }
    let grant = ctx.auth_store.authorize(&principal, &request.client_id)?;
    Ok((request, principal, grant))
}

/// Answers a connection past the connection limit: CONNACK "server busy" (MQTT 5) / "server
/// unavailable" (3.1.1) once its CONNECT arrives, then close.
pub async fn refuse_busy<S>(stream: S, peer: SocketAddr, ctx: &ConnectionContext)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut input = BytesMut::new();
    let connect = tokio::time::timeout(ctx.connect_timeout, read_connect(&mut reader, &mut input, ctx.limits.max_packet_size)).await;
    if let Ok(Ok(Some((version, _)))) = connect {
        write_refusal(&mut writer, version, v5::ConnectReturnCode::ServerBusy).await;
    }
    refused(peer, "connection limit reached");
}

/// Carries out the session's broker work in order.
async fn run_actions(session: &mut Session, broker: &Broker) {
    while let Some(action) = session.next_action() {
        match action {
            Action::Publish(message) => {
                broker.publish(message).await;
            }
            Action::Subscribe { filter, options, retain_handling } => {
                let is_new = broker.subscribe(session.record(), &filter, options.clone());
                if retain_handling == RetainHandling::Always || (retain_handling == RetainHandling::IfNew && is_new) {
                    session.queue_retained(broker.retained_for(&filter, &options));
                }
            }
            Action::Unsubscribe { filter } => {
                broker.unsubscribe(session.record(), &filter);
            }
        }
    }
}

/// Moves queued messages into the session while its send window is open.
fn fill_from_queues(session: &mut Session, mailbox: &crate::broker::mailbox::Mailbox) {
    let now = Instant::now();
    for _ in 0..MAX_DELIVERIES_PER_BATCH {
        if !session.can_send() {
            break;
        }
        let next: Option<Delivery> = session.take_pending().or_else(|| mailbox.pop());
        match next {
            Some(delivery) => session.deliver(delivery, now),
            None => break,
        }
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(writer: &mut W, data: &[u8]) -> std::io::Result<()> {
    writer.write_all(data).await?;
    writer.flush().await
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("read failed before CONNECT: {0}")]
    Io(#[from] std::io::Error),
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<(ProtocolVersion, v5::Connect)>, ConnectError> {
    loop {
        if let Some(found) = codec::decode_connect(input, max_packet_size)? {
            return Ok(Some(found));
        }
        if reader.read_buf(input).await? == 0 {
            return Ok(None);
        }
    }
}

/// Sends a refusing CONNACK and closes the stream.
async fn write_refusal<W: AsyncWrite + Unpin>(writer: &mut W, version: ProtocolVersion, code: v5::ConnectReturnCode) {
    let connack = v5::ConnAck { session_present: false, code, properties: None };
    let mut out = BytesMut::new();
    if codec::encode(version, &Packet::ConnAck(connack), &mut out, None).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), write_flush(writer, &out)).await;
        let _ = writer.shutdown().await;
    }
}

fn refused(peer: SocketAddr, why: &str) {
    metrics::connection_refused();
    tracing::info!(%peer, reason = why, "connection refused");
}
