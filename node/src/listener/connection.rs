//! The IO pump of one client connection: runs the CONNECT [`Handshake`] against the socket,
//! has the [`Authenticator`] decide who the client is, attaches to the session through the
//! broker, then runs the [`Session`] state machine against the socket, the session's mailbox, its
//! timer and the broker's signals (takeover, shutdown, authorization changes, kicks) until the
//! connection ends; then detaches and closes gracefully. Protocol decisions are the handshake's
//! and the session's, authentication decisions the authenticator's, session lifecycle decisions
//! the broker's; this file moves bytes and runs actions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v5::{self, DisconnectReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::auth::authenticator::{Authenticated, Authenticator, Origin, Proof};
use crate::auth::policy::{self, PeerAuth};
use crate::auth::state::ClientType;
use crate::auth::store::AuthStore;
use crate::broker::clients::{ClientInfo, ConnectedClients};
use crate::broker::message::{Delivery, WillCheck};
use crate::broker::{AttachRequest, Broker};
use crate::mqtt::connect::{self, Handshake, Handshaked, SessionLimits};
use crate::mqtt::session::{Action, Session};
use crate::telemetry::metrics;

/// Everything a connection needs from the node.
pub struct ConnectionContext {
    pub broker: Broker,
    pub limits: SessionLimits,
    /// Decides who a client is and what it may do.
    pub authenticator: Authenticator,
    /// Credentials, permissions and revocations in force (re-checked when they change).
    pub auth_store: Arc<AuthStore>,
    /// Who is connected here, for the admin API.
    pub clients: Arc<ConnectedClients>,
    /// Time allowed from accept to a complete CONNECT (with its AUTH exchange).
    pub connect_timeout: Duration,
    /// Time a write may make no progress before the client is dropped.
    pub write_timeout: Duration,
    /// Flips to true when the node shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Room a connection's read buffer keeps for the next read while the client sends little: most
/// connections are idle devices. A read that fills the room doubles it for the next one (up to
/// [`MAX_READ_ROOM`]), so a busy publisher reads in large pieces; quiet reads halve it again.
const INITIAL_READ_BUFFER: usize = 256;

/// The most room a read is given (larger packets still grow the buffer to fit).
const MAX_READ_ROOM: usize = 64 * 1024;

/// Largest batch of queued messages written per wake-up, so one busy client cannot starve its own reads.
const MAX_DELIVERIES_PER_BATCH: usize = 1024;

/// How long a closing connection keeps reading (and discarding) what the client still sends
/// after the broker's DISCONNECT, so the client reads the reason instead of a reset.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);

/// Longest wait for the final DISCONNECT to be written.
const CLOSE_WRITE: Duration = Duration::from_secs(5);

/// What a connection past its CONNECT keeps: its session state machine, who the client is, and
/// its ties to the broker.
struct Live<'a> {
    session: Session,
    principal: policy::Principal,
    owner: policy::Owner,
    client_id: String,
    mailbox: Arc<crate::broker::mailbox::Mailbox>,
    attachment: crate::broker::Attachment,
    registration: crate::broker::clients::Registration<'a>,
    /// When the client's token expires (its connection then ends), if it has one.
    expires_at: Option<i64>,
}

/// Serves one client connection to completion. Establishing it and closing it run in their own
/// allocations (`Box::pin`), and the stream is split before the connection's future exists:
/// only what a live connection needs stays in the task of an idle one.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    peer_auth: PeerAuth,
    ctx: Arc<ConnectionContext>,
    listener: &'static str,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (reader, writer) = tokio::io::split(stream);
    pump(reader, writer, peer, peer_auth, ctx, listener)
}

async fn pump<S>(
    mut reader: tokio::io::ReadHalf<S>,
    mut writer: tokio::io::WriteHalf<S>,
    peer: SocketAddr,
    peer_auth: PeerAuth,
    ctx: Arc<ConnectionContext>,
    listener: &'static str,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut input = BytesMut::with_capacity(INITIAL_READ_BUFFER);
    // Watched from before authentication, so a change applied meanwhile is re-checked below.
    let mut auth_changes = ctx.auth_store.changes();
    auth_changes.borrow_and_update();
    let live = Box::pin(establish(peer, &peer_auth, &ctx, listener, (&mut reader, &mut writer, &mut input)));
    let Some(Live { mut session, principal, owner, client_id, mailbox, mut attachment, mut registration, mut expires_at }) = live.await
    else {
        return;
    };
    let broker = &ctx.broker;
    let mut shutdown = ctx.shutdown.clone();
    let mut read_room = INITIAL_READ_BUFFER;

    loop {
        // Boxed: publishing's state is large, and an idle connection keeps none of it.
        if session.has_actions() && !Box::pin(run_actions(&mut session, broker, &owner)).await {
            // Its acknowledgement would promise what no node holds: the client re-sends it.
            session.output().clear();
            crate::telemetry::metrics::puback_cluster_lost();
            session.kick(
                DisconnectReasonCode::UnspecifiedError,
                "a published message was dropped on its way to another node (puback = cluster); not acknowledged",
            );
        }
        if session.close_reason().is_some() {
            break;
        }
        fill_from_queues(&mut session, &mailbox);
        if !session.output().is_empty() {
            let written = tokio::select! {
                written = tokio::time::timeout(ctx.write_timeout, write_flush(&mut writer, session.output())) => written,
                // A takeover never waits on this connection's write.
                _ = attachment.taken_over.changed() => {
                    session.output().clear();
                    session.lost("taken over while a write was blocked");
                    break;
                }
            };
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
        input.reserve(read_room);
        tokio::select! {
            read = reader.read_buf(&mut input) => match read {
                Ok(0) => session.lost("connection closed by client without DISCONNECT"),
                Ok(n) => {
                    read_room = next_read_room(read_room, n);
                    session.handle_input(&mut input, Instant::now());
                }
                Err(e) => session.lost(format!("read failed: {e}")),
            },
            _ = mailbox.readable(), if session.can_send() => {}
            _ = sleep_until(deadline) => session.tick(Instant::now()),
            _ = attachment.taken_over.changed() => session.kick(DisconnectReasonCode::SessionTakenOver, "another connection took over this client id"),
            _ = shutdown.changed() => session.kick(DisconnectReasonCode::ServerShuttingDown, "broker shutting down"),
            _ = sleep_until_unix(expires_at) => session.kick(DisconnectReasonCode::MaximumConnectTime, "the client's token expired"),
            _ = auth_changes.changed() => match ctx.auth_store.authorize(&principal, session.client_id()) {
                Ok(grant) => {
                    expires_at = grant.expires_at;
                    session.set_acl(grant.acl);
                }
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
    let farewell = session.output().split();
    let (state, will) = session.finish();
    // A delayed will is checked again when it fires: the client may have lost the right meanwhile.
    let will = will.map(|will| {
        let (store, principal, client_id) = (ctx.auth_store.clone(), principal.clone(), client_id.clone());
        let check: WillCheck = Box::new(move |will| {
            let grant = store.authorize(&principal, &client_id).map_err(|refusal| refusal.reason)?;
            grant.acl.may_publish(&will.topic).then(|| principal.owner()).ok_or_else(|| "its topic is no longer authorized".to_string())
        });
        (will, check)
    });
    if let Some(close) = &close {
        tracing::info!(%peer, %client_id, reason = ?close.reason, detail = %close.detail, "client disconnected");
    }
    metrics::connection_closed();
    Box::pin(async {
        if let Some(ticket) = broker.detach(attachment, state, will, Instant::now()) {
            broker.wait_durable(ticket).await;
        }
        // Only now, with the session offline (or ended) and a durable one on disk, does the
        // client see the close.
        close_gracefully(&mut reader, &mut writer, &farewell, &mut input).await;
    })
    .await;
}

/// Reads and authorizes the CONNECT, hands the connection its session and registers it; `None`
/// when the connection is refused (the refusal is written and logged).
async fn establish<'a, R, W>(
    peer: SocketAddr,
    peer_auth: &PeerAuth,
    ctx: &'a ConnectionContext,
    listener: &'static str,
    (reader, writer, input): (&mut R, &mut W, &mut BytesMut),
) -> Option<Live<'a>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let broker = &ctx.broker;
    let mut handshake = Handshake::new(ctx.limits.clone(), ctx.connect_timeout, Instant::now());
    let start_exchange = |method: &str| ctx.authenticator.start_exchange(method, peer);
    let mut request = match read_connect(&mut handshake, (reader, writer, input), broker, start_exchange).await {
        Ok(request) => request,
        Err((reply, reason)) => {
            refuse(writer, &reply, (peer, handshake.client_id()), &reason).await;
            return None;
        }
    };
    let (version, asked_for) = (request.version, request.client_id.clone());
    let origin = Origin { peer, listener, peer_auth };
    let (password, verified_user) = (request.password.take(), request.verified_user.clone());
    let proof = match &verified_user {
        Some(user) => Proof::Exchanged(user),
        None => Proof::Password(password.as_deref()),
    };
    let Authenticated { principal, grant } = match ctx.authenticator.authenticate(request.claimed_identity(), proof, origin).await {
        Ok(authenticated) => authenticated,
        Err(refusal) => {
            let reply = connect::refusal_reply(version, refusal.code);
            refuse(writer, &reply, (peer, Some(&asked_for)), &refusal.reason).await;
            return None;
        }
    };
    let owner = principal.owner();
    let durable = grant.client_type == ClientType::Application;
    let attach = AttachRequest {
        client_id: &request.client_id,
        owner: &owner,
        clean_start: request.clean_start,
        durable,
        queue_capacity: grant.max_queued_messages.unwrap_or_else(|| broker.default_queue_capacity(durable)),
    };
    let attached = match broker.attach(attach, Instant::now()).await {
        Ok(attached) => attached,
        Err(e) => {
            let reason = format!("client id {:?}: {e}", request.client_id);
            refuse(writer, &connect::refusal_reply(version, e.connect_code()), (peer, Some(&request.client_id)), &reason).await;
            return None;
        }
    };
    let client_id = request.client_id.clone();
    let identity = principal.identity.as_deref().unwrap_or("-");
    let present = attached.present;
    tracing::info!(%peer, %client_id, %identity, ?version, clean_start = request.clean_start, session_present = present, "client connected");
    metrics::connection_opened();
    let mailbox = attached.session.mailbox.clone();
    let attachment = attached.attachment;
    let cert = principal.certificate.as_ref();
    let registration = ctx.clients.register(ClientInfo {
        client_id: client_id.clone(),
        identity: principal.identity.clone().or(principal.username.clone()).unwrap_or_default(),
        client_type: grant.client_type,
        credential: grant.source.credential().unwrap_or_default().to_string(),
        cert_serial: cert.map(|c| c.serial.clone()).unwrap_or_default(),
        cert_issuer: cert.map(|c| c.issuer.clone()).unwrap_or_default(),
        cert_not_after: cert.map_or(0, |c| c.not_after),
        connected_at: crate::clock::unix_now(),
        peer: peer.to_string(),
    });
    let methods = ctx.authenticator.reauthentication();
    let session = Session::start(request, attached.session, present, ctx.limits.clone(), grant.acl, methods, Instant::now());
    Some(Live { session, principal, owner, client_id, mailbox, attachment, registration, expires_at: grant.expires_at })
}

/// The room for the next read after one of `read` bytes was given `room`.
fn next_read_room(room: usize, read: usize) -> usize {
    if read >= room {
        (room * 2).min(MAX_READ_ROOM)
    } else if read < room / 4 {
        (room / 2).max(INITIAL_READ_BUFFER)
    } else {
        room
    }
}

/// Writes the last bytes (a DISCONNECT with its reason), half-closes, and reads until the client
/// closes too or [`CLOSE_DRAIN`] passes, so a client still writing is not reset before it reads
/// the reason.
async fn close_gracefully<R, W>(reader: &mut R, writer: &mut W, farewell: &[u8], input: &mut BytesMut)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !farewell.is_empty() && tokio::time::timeout(CLOSE_WRITE, write_flush(writer, farewell)).await.is_err() {
        return;
    }
    if tokio::time::timeout(CLOSE_WRITE, writer.shutdown()).await.is_err() || farewell.is_empty() {
        return;
    }
    let drain = async {
        loop {
            input.clear();
            if !matches!(reader.read_buf(input).await, Ok(n) if n > 0) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN, drain).await;
}

/// Answers a connection past the connection limit: CONNACK "server busy" (MQTT 5) / "server
/// unavailable" (3.1.1) once its CONNECT arrives, then close.
pub async fn refuse_busy<S>(stream: S, peer: SocketAddr, ctx: &ConnectionContext)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut input = BytesMut::new();
    let mut handshake = Handshake::new(ctx.limits.clone(), ctx.connect_timeout, Instant::now());
    let busy = || crate::auth::Refusal { code: v5::ConnectReturnCode::ServerBusy, reason: "connection limit reached".into() };
    let connect = read_connect(&mut handshake, (&mut reader, &mut writer, &mut input), &ctx.broker, |_: &str| Err(busy())).await;
    let (reply, client_id) = match connect {
        Ok(request) => (connect::refusal_reply(request.version, busy().code), Some(request.client_id)),
        Err((reply, _)) => (reply, None),
    };
    refuse(&mut writer, &reply, (peer, client_id.as_deref()), "connection limit reached").await;
}

/// Runs the handshake against the socket until it has a validated (and, with an AUTH exchange,
/// verified) CONNECT, or the reply and reason to refuse with.
async fn read_connect<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    handshake: &mut Handshake,
    (reader, writer, input): (&mut R, &mut W, &mut BytesMut),
    broker: &Broker,
    start_exchange: impl Fn(&str) -> Result<Box<dyn crate::auth::sasl::Exchange>, crate::auth::Refusal>,
) -> Result<connect::ConnectRequest, (BytesMut, String)> {
    let deadline = tokio::time::Instant::from_std(handshake.deadline());
    loop {
        let step = match handshake.handle_input(input, || broker.generate_client_id(), &start_exchange) {
            Handshaked::Pending => tokio::select! {
                read = reader.read_buf(input) => match read {
                    Ok(0) => Handshaked::Refused { reply: BytesMut::new(), reason: "closed during CONNECT".into() },
                    Ok(_) => Handshaked::Pending,
                    Err(e) => Handshaked::Refused { reply: BytesMut::new(), reason: format!("read failed during CONNECT: {e}") },
                },
                _ = tokio::time::sleep_until(deadline) => handshake.tick(Instant::now()).unwrap_or(Handshaked::Pending),
            },
            decided => decided,
        };
        match step {
            Handshaked::Pending => {}
            Handshaked::Send(out) => match tokio::time::timeout_at(deadline, write_flush(writer, &out)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err((BytesMut::new(), format!("write failed during authentication: {e}"))),
                Err(_) => return Err((BytesMut::new(), "authentication not complete by the CONNECT deadline".into())),
            },
            Handshaked::Connect(request) => return Ok(*request),
            Handshaked::Refused { reply, reason } => return Err((reply, reason)),
        }
    }
}

/// Carries out the session's broker work in order; returns once every session-store write it
/// caused is durable, so acknowledgements written afterwards never promise more than the disk
/// holds, and whether every published message is held where the PUBACK policy asks (false: one
/// was dropped on its way to another node).
async fn run_actions(session: &mut Session, broker: &Broker, publisher: &policy::Owner) -> bool {
    let mut durable_ticket = None;
    let mut remote_acks = Vec::new();
    let mut subscribed = false;
    while let Some(action) = session.next_action() {
        match action {
            Action::Publish(message, held) => {
                let published = broker.publish(message, Some(publisher)).await;
                if let Some(held) = held {
                    session.retained_published(held, published.over_quota);
                }
                durable_ticket = durable_ticket.max(published.durable_ticket);
                remote_acks.extend(published.remote_acks);
            }
            Action::Subscribe { filter, options, is_new, with_retained } => {
                let retained = broker.subscribe(session.state(), &filter, options, (is_new, with_retained));
                session.queue_retained(retained);
                subscribed = true;
            }
            Action::Unsubscribe { filter } => broker.unsubscribe(session.state(), &filter),
            Action::Redispatch { delivery, reason } => broker.redispatch(delivery, session.state().id, reason),
        }
    }
    if let Some(ticket) = durable_ticket {
        broker.wait_durable(ticket).await;
    }
    let held = broker.wait_remote_acks(remote_acks).await;
    if subscribed {
        broker.routes_announced().await;
    }
    held
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

/// Sleeps until a time in seconds since the epoch (forever for `None`).
async fn sleep_until_unix(at: Option<i64>) {
    match at {
        Some(at) => tokio::time::sleep(Duration::from_secs(at.saturating_sub(crate::clock::unix_now()).max(0) as u64)).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Logs a refused CONNECT with the client id it asked for (when its CONNECT was read) and why,
/// then answers it with `reply` and closes: the line is written before the client can see the
/// refusal.
async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, reply: &[u8], (peer, client_id): (SocketAddr, Option<&str>), why: &str) {
    metrics::connection_refused();
    tracing::info!(%peer, client_id = client_id.unwrap_or("-"), reason = why, "connection refused");
    if !reply.is_empty() {
        let _ = tokio::time::timeout(CLOSE_WRITE, write_flush(writer, reply)).await;
        let _ = tokio::time::timeout(CLOSE_WRITE, writer.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_reader_gets_more_room_and_a_quiet_one_gives_it_back() {
        let mut room = INITIAL_READ_BUFFER;
        for _ in 0..20 {
            room = next_read_room(room, room);
        }
        assert_eq!(room, MAX_READ_ROOM, "full reads double it, up to the cap");
        assert_eq!(next_read_room(room, room / 2), room, "half-full reads keep it");
        for _ in 0..20 {
            room = next_read_room(room, 2);
        }
        assert_eq!(room, INITIAL_READ_BUFFER, "quiet reads halve it back to the floor");
    }
}
