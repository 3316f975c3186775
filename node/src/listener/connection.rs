//! The IO pump of one client connection: reads the CONNECT, authenticates, attaches to the
//! session through the broker, then runs the [`Session`] state machine against the socket, the
//! session's mailbox, its timer and the broker's signals (takeover, shutdown, authorization
//! changes, kicks) until the connection ends; then detaches and closes gracefully. Protocol
//! decisions are the session's, session lifecycle decisions the broker's; this file moves bytes
//! and runs actions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v5::{self, DisconnectReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::auth::chain::{self, Presented};
use crate::auth::index::{AuthIndex, PasswordCheck};
use crate::auth::policy::Verified;
use crate::auth::policy::{self, AuthPolicy, PeerAuth};
use crate::auth::scram;
use crate::auth::state::ClientType;
use crate::auth::state::ProviderKind;
use crate::auth::store::AuthStore;
use crate::broker::clients::{ClientInfo, ConnectedClients};
use crate::broker::message::{Delivery, WillCheck};
use crate::broker::{AttachError, AttachRequest, Broker};
use crate::mqtt::codec::{self, Auth, AuthReason, Packet};
use crate::mqtt::connect::{self, Handshake, Handshaked, SessionLimits};
use crate::mqtt::session::{Action, RetainHandling, Session};
use crate::telemetry::metrics;

/// Everything a connection needs from the node.
pub struct ConnectionContext {
    pub broker: Broker,
    pub limits: SessionLimits,
    pub auth: AuthPolicy,
    /// Credentials, permissions and revocations in force.
    pub auth_store: Arc<AuthStore>,
    /// Who is connected here, for the admin API.
    pub clients: Arc<ConnectedClients>,
    /// Bounds password checks (concurrency, and rate per source address).
    pub password_gate: crate::auth::password_gate::PasswordGate,
    /// Time allowed from accept to a complete CONNECT.
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
    let (mut auths, mut reauth, mut read_room) = (Vec::new(), None, INITIAL_READ_BUFFER);

    loop {
        // Boxed: publishing's state is large, and an idle connection keeps none of it.
        if session.has_actions() && !Box::pin(run_actions(&mut session, broker, &owner, &mut auths)).await {
            // Its acknowledgement would promise what no node holds: the client re-sends it.
            session.output().clear();
            crate::telemetry::metrics::puback_cluster_lost();
            session.kick(
                DisconnectReasonCode::UnspecifiedError,
                "a published message was dropped on its way to another node (puback = cluster); not acknowledged",
            );
        }
        for auth in auths.drain(..) {
            reauthenticate(&mut session, auth, &mut reauth, &principal, &ctx);
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
    let handshake = Handshake::new(ctx.limits.clone(), ctx.connect_timeout, Instant::now());
    let request = match read_connect(&handshake, reader, input, broker).await {
        Ok(request) => request,
        Err((reply, reason)) => {
            refuse(writer, &reply, (peer, None), &reason).await;
            return None;
        }
    };
    let (version, asked_for) = (request.version, request.client_id.clone());
    let (request, principal, grant) =
        match authorize(request, (peer, listener), peer_auth, ctx, (&mut *reader, &mut *writer, &mut *input)).await {
            Ok(accepted) => accepted,
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
            let code = match e {
                AttachError::NotOwner { .. } => v5::ConnectReturnCode::NotAuthorized,
                AttachError::TooManySessions { .. } => {
                    metrics::client_limit_refusal(metrics::ClientLimit::SessionsPerIdentity);
                    v5::ConnectReturnCode::QuotaExceeded
                }
                AttachError::TakeoverTimeout(_) | AttachError::Superseded => v5::ConnectReturnCode::ServerBusy,
                AttachError::PeersUnreachable(_) => v5::ConnectReturnCode::ServerUnavailable,
            };
            let reason = format!("client id {:?}: {e}", request.client_id);
            refuse(writer, &connect::refusal_reply(version, code), (peer, Some(&request.client_id)), &reason).await;
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
    let session = Session::start(request, attached.session, present, ctx.limits.clone(), grant.acl, Instant::now());
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

/// Authenticates (the provider chain: certificate, password, token, HTTP, in the configured
/// order; SCRAM when CONNECT names it) and authorizes a validated CONNECT. Unless a certificate
/// decides first, a CONNECT with a user name or password is checked on a blocking thread behind
/// the password gate (argon2id is slow by design, signatures cost too), and so is any CONNECT
/// while the `http` provider is enabled (its call blocks).
async fn authorize<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut request: connect::ConnectRequest,
    (peer, listener): (SocketAddr, &'static str),
    peer_auth: &PeerAuth,
    ctx: &ConnectionContext,
    io: (&mut R, &mut W, &mut BytesMut),
) -> Result<(connect::ConnectRequest, policy::Principal, crate::auth::index::Grant), crate::auth::Refusal> {
    if request.auth_method.is_some() {
        let principal = enhanced_auth(&mut request, peer, ctx, io).await?;
        let grant = ctx.auth_store.authorize(&principal, &request.client_id)?;
        return Ok((request, principal, grant));
    }
    let index = ctx.auth_store.current();
    if let Some(principal) = chain::certificate_first(&index, peer_auth, request.claimed_identity(), &ctx.auth) {
        let grant = ctx.auth_store.authorize(&principal, &request.client_id)?;
        return Ok((request, principal, grant));
    }
    let now = crate::clock::unix_now();
    let (store, runtime) = (ctx.auth_store.clone(), tokio::runtime::Handle::current());
    let run = move |index: &AuthIndex, request: &mut connect::ConnectRequest, peer_auth: &PeerAuth, policy: &AuthPolicy| {
        let password = request.password.clone();
        let presented = Presented {
            password: password.as_deref(),
            now,
            password_check: PasswordCheck::Verify,
            listener,
            peer: Some(peer.ip()),
            http: store.http().map(|delegate| (delegate, &runtime)),
        };
        chain::authenticate(index, peer_auth, request.claimed_identity(), policy, presented)
    };
    let costly = chain::is_costly(request.username.as_deref(), request.password.as_deref());
    // The HTTP provider blocks on the network: the chain then runs on a blocking thread too.
    let principal = if index.state().is_some() && (costly || chain::calls_out(&index)) {
        let refusal = |code, reason: String| crate::auth::Refusal { code, reason };
        let permit = if costly {
            ctx.password_gate
                .admit(peer.ip(), Instant::now())
                .map_err(|e| refusal(v5::ConnectReturnCode::ConnectionRateExceeded, e.to_string()))?;
            let permit = tokio::time::timeout(ctx.connect_timeout, ctx.password_gate.permit())
                .await
                .map_err(|_| refusal(v5::ConnectReturnCode::ServerBusy, "no free password check slot".into()))?;
            Some(permit)
        } else {
            None
        };
        let (peer_auth, policy) = (peer_auth.clone(), ctx.auth);
        // The permit moves into the check, so the slot stays taken until argon2 is done even
        // if this connection goes away first.
        let check = move || {
            let _permit = permit;
            let principal = run(&index, &mut request, &peer_auth, &policy);
            (request, principal)
        };
        let (checked, principal) = tokio::task::spawn_blocking(check)
            .await
            .map_err(|e| refusal(v5::ConnectReturnCode::ServerUnavailable, format!("credential check failed: {e}")))?;
        request = checked;
        principal?
    } else {
        run(&index, &mut request, peer_auth, &ctx.auth)?
    };
    let grant = ctx.auth_store.authorize(&principal, &request.client_id)?;
    Ok((request, principal, grant))
}

/// MQTT 5 enhanced authentication at CONNECT, by the `scram` provider alone (a CONNECT naming a
/// method is never passed to the other providers): AUTH with the server-first-message, the
/// client's AUTH with its final message, and the server-final-message goes into the CONNACK.
/// The exchange costs the server only hashes, so it runs here, paced by the password gate's
/// per-source rate.
async fn enhanced_auth<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    request: &mut connect::ConnectRequest,
    peer: SocketAddr,
    ctx: &ConnectionContext,
    (reader, writer, input): (&mut R, &mut W, &mut BytesMut),
) -> Result<policy::Principal, crate::auth::Refusal> {
    let refusal = |code, reason: String| crate::auth::Refusal { code, reason };
    let method = request.auth_method.clone().unwrap_or_default();
    let index = ctx.auth_store.current();
    let mechanism =
        scram::Mechanism::from_method(&method).filter(|_| index.provider_order().contains(&ProviderKind::Scram)).ok_or_else(|| {
            refusal(v5::ConnectReturnCode::BadAuthenticationMethod, format!("authentication method {method:?} is not enabled"))
        })?;
    ctx.password_gate
        .admit(peer.ip(), Instant::now())
        .map_err(|e| refusal(v5::ConnectReturnCode::ConnectionRateExceeded, e.to_string()))?;
    let client_first = request.auth_data.take().unwrap_or_default();
    let (server_first, pending) = scram::start(mechanism, &client_first, |u| index.scram_verifier(u, mechanism))?;
    let mut out = BytesMut::new();
    codec::encode(request.version, &Packet::Auth(auth_packet(AuthReason::ContinueAuthentication, &method, server_first)), &mut out, None)
        .map_err(|e| refusal(v5::ConnectReturnCode::UnspecifiedError, format!("AUTH: {e}")))?;
    let lost = |e: String| refusal(v5::ConnectReturnCode::UnspecifiedError, e);
    write_flush(writer, &out).await.map_err(|e| lost(format!("write failed during AUTH: {e}")))?;
    let read = async {
        loop {
            match codec::decode(request.version, input, ctx.limits.max_packet_size) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(refusal(v5::ConnectReturnCode::MalformedPacket, format!("during AUTH: {e}"))),
            }
            match reader.read_buf(input).await {
                Ok(0) => return Err(lost("closed during AUTH".into())),
                Ok(_) => {}
                Err(e) => return Err(lost(format!("read failed during AUTH: {e}"))),
            }
        }
    };
    let reply = tokio::time::timeout(ctx.connect_timeout, read)
        .await
        .map_err(|_| lost(format!("no AUTH reply within {:?}", ctx.connect_timeout)))??;
    let client_final = match reply {
        Packet::Auth(a) if a.reason == AuthReason::ContinueAuthentication && a.method.as_deref() == Some(method.as_str()) => {
            a.data.unwrap_or_default()
        }
        _ => {
            return Err(refusal(
                v5::ConnectReturnCode::ProtocolError,
                "expected AUTH (continue authentication) with the CONNECT's method".into(),
            ))
        }
    };
    let (username, server_final) = pending.finish(&client_final)?;
    request.auth_data = Some(server_final.into());
    request.username = Some(username.clone());
    let principal = policy::Principal {
        identity: None,
        username: Some(username.clone()),
        certificate: None,
        verified: Some(Verified::Scram(username)),
    };
    chain::bind_client_id(principal, &ctx.auth, &mut request.claimed_identity())
}

fn auth_packet(reason: AuthReason, method: &str, data: Vec<u8>) -> Auth {
    Auth { reason, method: Some(method.to_string()), data: Some(data.into()), reason_string: None, user_properties: Vec::new() }
}

/// One step of MQTT 5 re-authentication during a session (SCRAM again, same user): AUTH 0x19
/// starts it, AUTH 0x18 finishes it, AUTH 0x00 with the server-final-message confirms it. A
/// failure ends the session (DISCONNECT 0x87).
fn reauthenticate(
    session: &mut Session,
    auth: Auth,
    pending: &mut Option<Box<scram::Pending>>,
    principal: &policy::Principal,
    ctx: &ConnectionContext,
) {
    let method = auth.method.clone().unwrap_or_default();
    let data = auth.data.clone().unwrap_or_default();
    let outcome = match (auth.reason, pending.take(), scram::Mechanism::from_method(&method)) {
        (AuthReason::ReAuthenticate, None, Some(mechanism)) => {
            let index = ctx.auth_store.current();
            scram::start(mechanism, &data, |u| index.scram_verifier(u, mechanism)).map(|(server_first, started)| {
                *pending = Some(Box::new(started));
                auth_packet(AuthReason::ContinueAuthentication, &method, server_first)
            })
        }
        (AuthReason::ContinueAuthentication, Some(started), _) => match started.finish(&data) {
            Ok((username, server_final)) if principal.verified == Some(Verified::Scram(username.clone())) => {
                Ok(auth_packet(AuthReason::Success, &method, server_final))
            }
            Ok((username, _)) => Err(crate::auth::Refusal {
                code: v5::ConnectReturnCode::NotAuthorized,
                reason: format!("re-authenticated as {username:?}, not as the session's user"),
            }),
            Err(refusal) => Err(refusal),
        },
        _ => return session.kick(DisconnectReasonCode::ProtocolError, "AUTH out of sequence"),
    };
    match outcome {
        Ok(reply) => session.send_auth(reply),
        Err(refusal) => session.kick(DisconnectReasonCode::NotAuthorized, format!("re-authentication failed: {}", refusal.reason)),
    }
}

/// Answers a connection past the connection limit: CONNACK "server busy" (MQTT 5) / "server
/// unavailable" (3.1.1) once its CONNECT arrives, then close.
pub async fn refuse_busy<S>(stream: S, peer: SocketAddr, ctx: &ConnectionContext)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut input = BytesMut::new();
    let handshake = Handshake::new(ctx.limits.clone(), ctx.connect_timeout, Instant::now());
    let (reply, client_id) = match read_connect(&handshake, &mut reader, &mut input, &ctx.broker).await {
        Ok(request) => (connect::refusal_reply(request.version, v5::ConnectReturnCode::ServerBusy), Some(request.client_id)),
        Err((reply, _)) => (reply, None),
    };
    refuse(&mut writer, &reply, (peer, client_id.as_deref()), "connection limit reached").await;
}

/// Reads until the handshake has a validated CONNECT, or the reply and reason to refuse with.
async fn read_connect<R: AsyncRead + Unpin>(
    handshake: &Handshake,
    reader: &mut R,
    input: &mut BytesMut,
    broker: &Broker,
) -> Result<connect::ConnectRequest, (BytesMut, String)> {
    let deadline = tokio::time::Instant::from_std(handshake.deadline());
    loop {
        let step = match handshake.handle_input(input, || broker.generate_client_id()) {
            Handshaked::Pending => tokio::select! {
                read = reader.read_buf(input) => match read {
                    Ok(0) => Handshaked::Refused { reply: BytesMut::new(), reason: "closed before CONNECT".into() },
                    Ok(_) => Handshaked::Pending,
                    Err(e) => Handshaked::Refused { reply: BytesMut::new(), reason: format!("read failed before CONNECT: {e}") },
                },
                _ = tokio::time::sleep_until(deadline) => handshake.tick(Instant::now()).unwrap_or(Handshaked::Pending),
            },
            decided => decided,
        };
        match step {
            Handshaked::Pending => {}
            Handshaked::Connect(request) => return Ok(*request),
            Handshaked::Refused { reply, reason } => return Err((reply, reason)),
        }
    }
}

/// Carries out the session's broker work in order; returns once every session-store write it
/// caused is durable, so acknowledgements written afterwards never promise more than the disk
/// holds, and whether every published message is held where the PUBACK policy asks (false: one
/// was dropped on its way to another node).
async fn run_actions(session: &mut Session, broker: &Broker, publisher: &policy::Owner, auths: &mut Vec<Auth>) -> bool {
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
            Action::Subscribe { filter, options, retain_handling } => {
                let wants_retained = |is_new: bool| match retain_handling {
                    RetainHandling::Always => true,
                    RetainHandling::IfNew => is_new,
                    RetainHandling::Never => false,
                };
                let retained = broker.subscribe(session.state_mut(), &filter, options, wants_retained);
                session.queue_retained(retained);
                subscribed = true;
            }
            Action::Unsubscribe { filter } => {
                broker.unsubscribe(session.state_mut(), &filter);
            }
            Action::Authenticate(auth) => auths.push(auth),
            Action::Redispatch { delivery, reason } => broker.redispatch(delivery, session.state_mut().id, reason),
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

/// Writes a refusing CONNACK (if any), closes and logs the refusal.
/// Answers a refused CONNECT with `reply` and logs the refusal with the client id it asked for
/// (when its CONNECT was read) and why.
async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, reply: &[u8], (peer, client_id): (SocketAddr, Option<&str>), why: &str) {
    if !reply.is_empty() {
        let _ = tokio::time::timeout(CLOSE_WRITE, write_flush(writer, reply)).await;
        let _ = tokio::time::timeout(CLOSE_WRITE, writer.shutdown()).await;
    }
    metrics::connection_refused();
    tracing::info!(%peer, client_id = client_id.unwrap_or("-"), reason = why, "connection refused");
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
