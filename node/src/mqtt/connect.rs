//! The CONNECT phase of a connection, free of IO: [`Handshake`] takes bytes until a CONNECT is
//! complete — and, for MQTT 5 enhanced authentication, until its AUTH exchange has verified the
//! client — and turns it into the parameters of a new session ([`ConnectRequest`]), or into the
//! CONNACK refusal the client gets; time comes in as an argument. No broker state.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v5::{self, ConnectReturnCode};

use super::auth_exchange::{AuthExchange, Exchanged};
use super::codec::{self, DecodeError, Packet, ProtocolVersion};
use crate::auth::policy::{ClaimedIdentity, UnauthorizedPublish};
use crate::auth::sasl;
use crate::auth::Refusal;
use crate::broker::message::Will;
use crate::topic::{self, TopicLimits};

/// What the CONNECT phase decided.
#[derive(Debug)]
pub enum Handshaked {
    /// More bytes are needed.
    Pending,
    /// Write these bytes (an AUTH of the exchange), then go on with the input.
    Send(BytesMut),
    /// A CONNECT arrived, passed validation and finished its AUTH exchange if it started one;
    /// authentication comes next.
    Connect(Box<ConnectRequest>),
    /// The connection ends: `reply` (a refusing CONNACK, or nothing) is written first.
    Refused { reply: BytesMut, reason: String },
}

/// The CONNECT phase: the first packet must be a valid CONNECT, and any AUTH exchange it starts
/// must be over, before a deadline.
#[derive(Debug)]
pub struct Handshake {
    limits: SessionLimits,
    timeout: Duration,
    deadline: Instant,
    /// The CONNECT whose AUTH exchange is in progress.
    exchange: Option<(Box<ConnectRequest>, AuthExchange)>,
    /// The client id of the CONNECT read, once it passed validation (for refusal logs).
    client_id: Option<String>,
}

impl Handshake {
    /// A connection accepted at `now` that must complete its CONNECT within `timeout`.
    pub fn new(limits: SessionLimits, timeout: Duration, now: Instant) -> Handshake {
        Handshake { limits, timeout, deadline: now + timeout, exchange: None, client_id: None }
    }

    /// The client id the CONNECT asked for (or was assigned), once a valid CONNECT was read.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// When the connection is dropped if the CONNECT phase is not over.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Decodes and validates a CONNECT from `input`, then the client's side of its AUTH
    /// exchange. `generate_id` supplies a client id for a client that sent none; `start_exchange`
    /// the server side of the Authentication Method a CONNECT names.
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
        generate_id: impl FnOnce() -> String,
        start_exchange: impl FnOnce(&str) -> Result<Box<dyn sasl::Exchange>, Refusal>,
    ) -> Handshaked {
        if let Some((request, _)) = &self.exchange {
            return match codec::decode(request.version, input, self.limits.max_packet_size) {
                Ok(None) => Handshaked::Pending,
                Ok(Some(Packet::Auth(auth))) => {
                    let (request, mut exchange) = self.exchange.take().expect("an exchange in progress");
                    let exchanged = exchange.on_auth(auth);
                    self.exchanged(request, exchange, exchanged)
                }
                Ok(Some(other)) => {
                    let reason = format!("expected AUTH during authentication, got {}", other.name());
                    refused(request.version, Refusal { code: ConnectReturnCode::ProtocolError, reason })
                }
                Err(e) => {
                    refused(request.version, Refusal { code: ConnectReturnCode::MalformedPacket, reason: format!("during AUTH: {e}") })
                }
            };
        }
        match codec::decode_connect(input, self.limits.max_packet_size) {
            Ok(None) => Handshaked::Pending,
            Ok(Some((version, connect))) => match validate(version, connect, &self.limits, generate_id) {
                Ok(mut request) => {
                    self.client_id = Some(request.client_id.clone());
                    match request.auth_method.clone() {
                        None => Handshaked::Connect(Box::new(request)),
                        Some(method) => {
                            let first = request.auth_data.take().unwrap_or_default();
                            match start_exchange(&method).and_then(|server| AuthExchange::start(&method, server, &first)) {
                                Ok((exchange, exchanged)) => self.exchanged(Box::new(request), exchange, Ok(exchanged)),
                                Err(refusal) => refused(version, refusal),
                            }
                        }
                    }
                }
                Err(refusal) => refused(version, refusal),
            },
            Err(DecodeError::UnsupportedVersion(level)) => Handshaked::Refused {
                reply: refusal_reply(ProtocolVersion::V311, ConnectReturnCode::UnsupportedProtocolVersion),
                reason: format!("unsupported protocol level {level}"),
            },
            Err(e) => Handshaked::Refused { reply: BytesMut::new(), reason: e.to_string() },
        }
    }

    /// Goes on after a step of the exchange: another AUTH to send, or the verified CONNECT.
    fn exchanged(&mut self, mut request: Box<ConnectRequest>, exchange: AuthExchange, step: Result<Exchanged, Refusal>) -> Handshaked {
        match step {
            Ok(Exchanged::Continue(auth)) => {
                let mut out = BytesMut::new();
                if let Err(e) = codec::encode(request.version, &Packet::Auth(auth), &mut out, None) {
                    let refusal = Refusal { code: ConnectReturnCode::UnspecifiedError, reason: format!("AUTH: {e}") };
                    return refused(request.version, refusal);
                }
                self.exchange = Some((request, exchange));
                Handshaked::Send(out)
            }
            Ok(Exchanged::Verified { user, data }) => {
                request.auth_data = Some(data.into());
                request.username = Some(user.clone());
                request.verified_user = Some(user);
                Handshaked::Connect(request)
            }
            Err(refusal) => refused(request.version, refusal),
        }
    }

    /// The end of a connection whose CONNECT phase is not over by the deadline (`None` before it).
    pub fn tick(&self, now: Instant) -> Option<Handshaked> {
        let waiting_for = if self.exchange.is_some() { "authentication" } else { "CONNECT" };
        (now >= self.deadline)
            .then(|| Handshaked::Refused { reply: BytesMut::new(), reason: format!("no complete {waiting_for} within {:?}", self.timeout) })
    }
}

/// The refusing CONNACK of `refusal`, and why.
fn refused(version: ProtocolVersion, refusal: Refusal) -> Handshaked {
    Handshaked::Refused { reply: refusal_reply(version, refusal.code), reason: refusal.reason }
}

/// The CONNACK refusing a connection with `code` (mapped to a 3.1.1 return code for 3.1.1).
pub fn refusal_reply(version: ProtocolVersion, code: ConnectReturnCode) -> BytesMut {
    let mut out = BytesMut::new();
    let connack = v5::ConnAck { session_present: false, code, properties: None };
    if let Err(e) = codec::encode(version, &Packet::ConnAck(connack), &mut out, None) {
        tracing::warn!(error = %e, "could not encode a refusing CONNACK");
    }
    out
}

/// The broker-side limits a session works within (from the `[limits]` config section).
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Largest packet accepted from a client, in bytes (advertised as Maximum Packet Size).
    pub max_packet_size: usize,
    /// Incoming QoS 1/2 publishes a client may have unacknowledged (advertised Receive Maximum).
    pub receive_maximum: u16,
    /// Outgoing QoS 1/2 publishes in flight per client (also capped by the client's own Receive Maximum).
    pub max_inflight: u16,
    /// Topic aliases a client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Highest keep alive the broker accepts; larger requests get this as Server Keep Alive (MQTT 5).
    pub max_keep_alive: u16,
    /// Longest session expiry the broker grants, also applied to MQTT 3.1.1 persistent sessions.
    pub max_session_expiry: Duration,
    pub topics: TopicLimits,
    /// What an MQTT 3.1.1 client gets for an unauthorized PUBLISH.
    pub v3_unauthorized_publish: UnauthorizedPublish,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Bytes (topic + payload) of retained messages a session may have waiting after its
    /// SUBSCRIBEs; more are dropped.
    pub max_retained_replay_bytes: usize,
    /// Topic aliases the broker uses towards a client (also capped by the client's maximum).
    pub max_outgoing_topic_aliases: u16,
    /// How long a shared-group message may stay unacknowledged before another member gets it
    /// too; zero: no limit.
    pub shared_ack_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_packet_size: 1024 * 1024,
            receive_maximum: 100,
            max_inflight: 100,
            topic_alias_maximum: 64,
            max_keep_alive: 3600,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            topics: TopicLimits::default(),
            v3_unauthorized_publish: UnauthorizedPublish::Disconnect,
            max_subscriptions: 1000,
            max_retained_replay_bytes: 16 << 20,
            max_outgoing_topic_aliases: 64,
            shared_ack_timeout: Duration::from_secs(30),
        }
    }
}

/// A CONNECT that passed validation.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub version: ProtocolVersion,
    pub client_id: String,
    /// The client sent an empty id and the broker generated this one.
    pub assigned_client_id: bool,
    pub clean_start: bool,
    /// Keep alive in force (the client's, or the broker's cap).
    pub keep_alive: u16,
    /// The client asked for more than `max_keep_alive` (MQTT 5 gets Server Keep Alive).
    pub keep_alive_capped: bool,
    /// How long the session outlives the connection (already capped by `max_session_expiry`).
    pub session_expiry: Duration,
    pub session_expiry_capped: bool,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Outgoing QoS 1/2 window the client allows (MQTT 5 Receive Maximum).
    pub client_receive_maximum: u16,
    /// Largest packet the client accepts.
    pub client_max_packet_size: Option<usize>,
    /// Topic aliases the client accepts from the broker.
    pub client_topic_alias_maximum: u16,
    /// Whether reason strings may be sent (MQTT 5 Request Problem Information).
    pub problem_information: bool,
    /// MQTT 5 enhanced authentication: the Authentication Method of the CONNECT, echoed in CONNACK.
    pub auth_method: Option<String>,
    /// The CONNECT's Authentication Data; once enhanced authentication succeeded, the server's
    /// final data for the CONNACK.
    pub auth_data: Option<bytes::Bytes>,
    /// The user the AUTH exchange verified (also the user name from then on).
    pub verified_user: Option<String>,
}

impl ConnectRequest {
    /// Who the client claims to be, for the CONNECT policy (which may rewrite it).
    pub fn claimed_identity(&mut self) -> ClaimedIdentity<'_> {
        ClaimedIdentity { client_id: &mut self.client_id, assigned_client_id: self.assigned_client_id, username: &mut self.username }
    }
}

fn refuse(code: ConnectReturnCode, reason: impl Into<String>) -> Refusal {
    Refusal { code, reason: reason.into() }
}

/// Validates a CONNECT. `generate_id` supplies a client id when the client sent none.
pub fn validate(
    version: ProtocolVersion,
    connect: v5::Connect,
    limits: &SessionLimits,
    generate_id: impl FnOnce() -> String,
) -> Result<ConnectRequest, Refusal> {
    let props = connect.properties;
    let prop = |get: fn(&v5::ConnectProperties) -> Option<u32>| props.as_ref().and_then(get);
    let v5 = version == ProtocolVersion::V5;
    let assigned_client_id = connect.client_id.is_empty();
    let client_id = if assigned_client_id {
        if !v5 && !connect.clean_session {
            return Err(refuse(
                ConnectReturnCode::ClientIdentifierNotValid,
                "a zero-length client id needs clean session = 1 in MQTT 3.1.1",
            ));
        }
        generate_id()
    } else {
        connect.client_id
    };
    if client_id.contains('\0') || client_id.len() > 65_535 {
        return Err(refuse(ConnectReturnCode::ClientIdentifierNotValid, "client id contains NUL"));
    }

    let requested_expiry = if v5 {
        match prop(|p| p.session_expiry_interval).unwrap_or(0) {
            u32::MAX => None,
            secs => Some(Duration::from_secs(secs.into())),
        }
    } else if connect.clean_session {
        Some(Duration::ZERO)
    } else {
        None
    };
    let session_expiry = requested_expiry.map_or(limits.max_session_expiry, |e| e.min(limits.max_session_expiry));
    let session_expiry_capped = Some(session_expiry) != requested_expiry;

    // Keep alive 0 (no keep alive) is treated as longer than any: it gets the cap too.
    let keep_alive_capped = connect.keep_alive == 0 || connect.keep_alive > limits.max_keep_alive;
    let keep_alive = if connect.keep_alive == 0 { limits.max_keep_alive } else { connect.keep_alive.min(limits.max_keep_alive) };

    let will = connect.last_will.map(|w| lift_will(w, limits)).transpose()?;
    let (username, password) = match connect.login {
        Some(login) => (Some(login.username), Some(login.password)),
        None => (None, None),
    };
    Ok(ConnectRequest {
        version,
        client_id,
        assigned_client_id,
        clean_start: connect.clean_session,
        keep_alive,
        keep_alive_capped,
        session_expiry,
        session_expiry_capped,
        will,
        username,
        password,
        client_receive_maximum: props.as_ref().and_then(|p| p.receive_maximum).unwrap_or(u16::MAX),
        client_max_packet_size: prop(|p| p.max_packet_size).map(|s| s as usize),
        client_topic_alias_maximum: props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0),
        problem_information: props.as_ref().and_then(|p| p.request_problem_info) != Some(0),
        auth_method: props.as_ref().and_then(|p| p.authentication_method.clone()),
        auth_data: props.as_ref().and_then(|p| p.authentication_data.clone()),
        verified_user: None,
    })
}

fn lift_will(will: v5::LastWill, limits: &SessionLimits) -> Result<Will, Refusal> {
    topic::validate_name(&will.topic, limits.topics)
        .map_err(|e| refuse(ConnectReturnCode::TopicNameInvalid, format!("will topic: {e}")))?;
    let Some(props) = will.properties else {
        return Ok(Will {
            topic: will.topic,
            payload: will.message,
            qos: will.qos,
            retain: will.retain,
            properties: None,
            message_expiry: None,
            delay: Duration::ZERO,
        });
    };
    if props.payload_format_indicator == Some(1) && std::str::from_utf8(&will.message).is_err() {
        return Err(refuse(ConnectReturnCode::PayloadFormatInvalid, "will payload is not UTF-8 as its format indicator says"));
    }
    let passthrough = v5::PublishProperties {
        payload_format_indicator: props.payload_format_indicator,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: props.response_topic,
        correlation_data: props.correlation_data,
        user_properties: props.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: props.content_type,
    };
    Ok(Will {
        topic: will.topic,
        payload: will.message,
        qos: will.qos,
        retain: will.retain,
        properties: Some(passthrough),
        message_expiry: props.message_expiry_interval.map(|s| Duration::from_secs(s.into())),
        delay: Duration::from_secs(props.delay_interval.unwrap_or(0).into()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mqtt::auth_exchange::auth_packet;

    /// CONNECT properties with nothing set.
    pub(crate) fn no_properties() -> v5::ConnectProperties {
        v5::ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }
    }
    use crate::mqtt::codec::AuthReason;

    fn handshake(now: Instant) -> Handshake {
        Handshake::new(SessionLimits::default(), Duration::from_secs(10), now)
    }

    fn no_exchange(method: &str) -> Result<Box<dyn sasl::Exchange>, Refusal> {
        panic!("no exchange expected, {method:?} asked for")
    }

    fn knock(method: &str) -> Result<Box<dyn sasl::Exchange>, Refusal> {
        crate::mqtt::auth_exchange::tests::knock_methods().start(method)
    }

    fn encoded(version: ProtocolVersion, packet: Packet) -> BytesMut {
        let mut bytes = BytesMut::new();
        codec::encode(version, &packet, &mut bytes, None).unwrap();
        bytes
    }

    fn connect_with_method(method: &str, data: &str) -> BytesMut {
        let mut connect = v5::Connect::new("c1");
        connect.properties = Some(v5::ConnectProperties {
            authentication_method: Some(method.into()),
            authentication_data: Some(bytes::Bytes::copy_from_slice(data.as_bytes())),
            ..no_properties()
        });
        encoded(ProtocolVersion::V5, Packet::Connect(connect))
    }

    fn auth(reason: AuthReason, method: &str, data: &str) -> BytesMut {
        encoded(ProtocolVersion::V5, Packet::Auth(auth_packet(reason, method, data.as_bytes().to_vec())))
    }

    fn sent_auth(step: Handshaked) -> codec::Auth {
        match step {
            Handshaked::Send(mut out) => match codec::decode(ProtocolVersion::V5, &mut out, usize::MAX) {
                Ok(Some(Packet::Auth(auth))) => auth,
                other => panic!("expected AUTH, got {other:?}"),
            },
            other => panic!("expected AUTH to send, got {other:?}"),
        }
    }

    #[test]
    fn an_auth_exchange_ends_in_a_verified_connect() {
        let mut h = handshake(Instant::now());
        let challenge = sent_auth(h.handle_input(&mut connect_with_method("KNOCK", "dev:1"), || unreachable!(), knock));
        assert_eq!((challenge.reason, challenge.data.as_deref()), (AuthReason::ContinueAuthentication, Some(&b"prove"[..])));
        let mut answer = auth(AuthReason::ContinueAuthentication, "KNOCK", "secret");
        let mut first_half = answer.split_to(3);
        assert!(matches!(h.handle_input(&mut first_half, || unreachable!(), no_exchange), Handshaked::Pending));
        first_half.unsplit(answer);
        match h.handle_input(&mut first_half, || unreachable!(), no_exchange) {
            Handshaked::Connect(request) => {
                assert_eq!(request.verified_user.as_deref(), Some("dev"));
                assert_eq!(request.username.as_deref(), Some("dev"));
                assert_eq!(request.auth_data.as_deref(), Some(&b"welcome"[..]), "the server's final data goes into the CONNACK");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_auth_exchange_refuses_unknown_methods_wrong_answers_and_other_packets() {
        let refusal = |step: Handshaked| match step {
            Handshaked::Refused { mut reply, reason } => (connack_code(ProtocolVersion::V5, &mut reply), reason),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let mut h = handshake(Instant::now());
        let (code, _) = refusal(h.handle_input(&mut connect_with_method("PLAIN", "x"), || unreachable!(), knock));
        assert_eq!(code, ConnectReturnCode::BadAuthenticationMethod);
        let started = || {
            let mut h = handshake(Instant::now());
            sent_auth(h.handle_input(&mut connect_with_method("KNOCK", "dev:1"), || unreachable!(), knock));
            h
        };
        let wrong = refusal(started().handle_input(
            &mut auth(AuthReason::ContinueAuthentication, "KNOCK", "guess"),
            || unreachable!(),
            no_exchange,
        ));
        assert_eq!(wrong.0, ConnectReturnCode::BadUserNamePassword);
        let other_method =
            started().handle_input(&mut auth(AuthReason::ContinueAuthentication, "OTHER", "secret"), || unreachable!(), no_exchange);
        assert_eq!(refusal(other_method).0, ConnectReturnCode::ProtocolError);
        let (code, reason) =
            refusal(started().handle_input(&mut encoded(ProtocolVersion::V5, Packet::PingReq), || unreachable!(), no_exchange));
        assert_eq!(code, ConnectReturnCode::ProtocolError);
        assert!(reason.contains("expected AUTH during authentication, got PINGREQ"), "{reason}");
        let waiting = started();
        let late = waiting.tick(waiting.deadline());
        assert!(matches!(late, Some(Handshaked::Refused { reason, .. }) if reason.contains("no complete authentication within 10s")));
    }

    fn connack_code(version: ProtocolVersion, reply: &mut BytesMut) -> ConnectReturnCode {
        match codec::decode(version, reply, usize::MAX) {
            Ok(Some(Packet::ConnAck(ack))) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    #[test]
    fn a_connect_in_pieces_becomes_a_request() {
        let mut bytes = BytesMut::new();
        codec::encode(ProtocolVersion::V5, &Packet::Connect(v5::Connect::new("c1")), &mut bytes, None).unwrap();
        let mut h = handshake(Instant::now());
        let mut input = bytes.split_to(5);
        assert!(matches!(h.handle_input(&mut input, || unreachable!(), no_exchange), Handshaked::Pending));
        input.extend_from_slice(&bytes);
        match h.handle_input(&mut input, || unreachable!(), no_exchange) {
            Handshaked::Connect(request) => assert_eq!((request.client_id.as_str(), request.version), ("c1", ProtocolVersion::V5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_carry_the_connack_to_send() {
        let mut h = handshake(Instant::now());
        let mut unsupported = BytesMut::from(&[0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x09, 0x02, 0x00, 0x3C, 0x00, 0x00][..]);
        match h.handle_input(&mut unsupported, || unreachable!(), no_exchange) {
            Handshaked::Refused { mut reply, reason } => {
                assert_eq!(connack_code(ProtocolVersion::V311, &mut reply), ConnectReturnCode::UnsupportedProtocolVersion);
                assert!(reason.contains("protocol level 9"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let mut connect = v5::Connect::new("");
        connect.clean_session = false;
        let mut bytes = BytesMut::new();
        codec::encode(ProtocolVersion::V311, &Packet::Connect(connect), &mut bytes, None).unwrap();
        match h.handle_input(&mut bytes, || "generated".into(), no_exchange) {
            Handshaked::Refused { mut reply, .. } => {
                assert_eq!(connack_code(ProtocolVersion::V311, &mut reply), ConnectReturnCode::ClientIdentifierNotValid)
            }
            other => panic!("{other:?}"),
        }
        let mut not_connect = BytesMut::from(&[0xC0, 0x00][..]);
        assert!(
            matches!(h.handle_input(&mut not_connect, || unreachable!(), no_exchange), Handshaked::Refused { reply, .. } if reply.is_empty())
        );
    }

    #[test]
    fn the_connect_deadline_is_kept() {
        let start = Instant::now();
        let h = handshake(start);
        assert!(h.tick(start + Duration::from_secs(9)).is_none());
        assert!(
            matches!(h.tick(h.deadline()), Some(Handshaked::Refused { reason, .. }) if reason.contains("no complete CONNECT within 10s"))
        );
    }

    #[test]
    fn keep_alive_zero_gets_the_server_maximum() {
        let limits = SessionLimits { max_keep_alive: 600, ..SessionLimits::default() };
        let mut connect = v5::Connect::new("c");
        connect.keep_alive = 0;
        let request = validate(ProtocolVersion::V5, connect, &limits, || unreachable!()).unwrap();
        assert_eq!((request.keep_alive, request.keep_alive_capped), (600, true));
    }
}
