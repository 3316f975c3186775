//! The per-connection MQTT session state machine, free of IO.
//!
//! Bytes from the client go in through [`Session::handle_input`]; messages for the client go in
//! through [`Session::deliver`]. Out come encoded bytes for the socket ([`Session::output`]),
//! broker work ([`Action`]s: route a publish, add or remove a subscription) and, at the end, a
//! [`Close`] decision. The IO driver executes the actions in order *before* it writes the bytes,
//! so a PUBACK never reaches the client before its message was routed and a SUBACK never before
//! the subscription is live.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v5::{self, DisconnectReasonCode as Reason};
use mqttbytes::QoS;

use super::auth_exchange::{auth_packet, AuthExchange, Exchanged};
use super::codec::{self, Auth, AuthReason, Packet, ProtocolVersion};
use super::connect::{ConnectRequest, SessionLimits};
use crate::auth::acl::{Acl, SessionAcl};
use crate::auth::policy::UnauthorizedPublish;
use crate::auth::sasl;
use crate::broker::index::SubscriptionOptions;
use crate::broker::message::Will;
use crate::broker::message::{Delivery, Message};
use crate::broker::{Inflight, SessionState};
use crate::telemetry::metrics::{self, DropReason, RedispatchReason, RetainedLimit};
use crate::topic;

/// Shortest time between two log lines about a client's unauthorized PUBLISHes.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Broker work the driver must carry out, in order, before writing [`Session::output`].
// Publish is by far the most frequent action: boxing its message would cost an allocation per
// message to save bytes in a queue that is drained at once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    /// Route a message to subscribers (and the retained store). A retained message comes with
    /// its acknowledgement held until the broker has taken it (the publisher's retained quota
    /// may refuse it): hand it back with [`Session::retained_published`].
    Publish(Message, Option<HeldAck>),
    /// Put a subscription the session added (`is_new`) or replaced into the broker's index;
    /// when `with_retained`, queue the matching retained messages with
    /// [`Session::queue_retained`].
    Subscribe { filter: String, options: SubscriptionOptions, is_new: bool, with_retained: bool },
    /// Take a subscription the session removed out of the broker's index.
    Unsubscribe { filter: String },
    /// Give a message this session got as a shared-group member to another member: the client
    /// refused it, or did not acknowledge it within `shared_ack_timeout`.
    Redispatch { delivery: Delivery, reason: RedispatchReason },
}

/// The acknowledgement of a retained PUBLISH, waiting for the broker's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAck {
    qos: QoS,
    pkid: u16,
    topic: String,
}

/// Why the connection ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Close {
    /// MQTT 5 reason (sent in a DISCONNECT by the broker unless the client disconnected).
    pub reason: Reason,
    /// Human-readable cause, for logs.
    pub detail: String,
    /// Whether the will message is published.
    pub publish_will: bool,
}

pub struct Session {
    version: ProtocolVersion,
    client_id: String,
    limits: SessionLimits,
    state: SessionState,
    keep_alive: Duration,
    last_received: Instant,
    /// Outgoing QoS 1/2 window (the client's Receive Maximum capped by `max_inflight`).
    send_window: usize,
    client_max_packet_size: Option<usize>,
    client_topic_alias_maximum: u16,
    outgoing_aliases: HashMap<String, u16>,
    incoming_aliases: HashMap<u16, String>,
    next_packet_id: u16,
    send_sequence: u64,
    /// Shared-group messages in flight, oldest first: when sent, packet id, send sequence.
    shared_unacked: VecDeque<(Instant, u16, u64)>,
    /// Messages queued by the session itself (retained messages after SUBSCRIBE), sent before the mailbox.
    pending: VecDeque<Delivery>,
    will: Option<Will>,
    /// What the client may publish, subscribe to and read, with read decisions cached.
    acl: SessionAcl,
    /// Bytes of retained messages waiting in `pending`.
    pending_retained_bytes: usize,
    /// Unauthorized PUBLISHes since the last one logged, and when that was (logging is rate-limited).
    refused_publishes: (u64, Option<Instant>),
    problem_information: bool,
    out: BytesMut,
    actions: VecDeque<Action>,
    close: Option<Close>,
    /// Re-authentication, for a client that authenticated with an AUTH exchange at CONNECT.
    reauth: Option<Box<Reauthentication>>,
}

/// A session's re-authentication (MQTT 5 §4.12.1): AUTH 0x19 starts an exchange of the CONNECT's
/// method, which must verify the same user again; a failure ends the session (DISCONNECT 0x87).
struct Reauthentication {
    method: String,
    user: String,
    methods: Arc<dyn sasl::Methods>,
    exchange: Option<AuthExchange>,
}

impl Session {
    /// Starts a session for an accepted CONNECT: writes the CONNACK and re-sends, with DUP set,
    /// every message the session still has in flight. `methods` answer re-authentication when the
    /// CONNECT authenticated with an AUTH exchange.
    pub fn start(
        request: ConnectRequest,
        mut state: SessionState,
        session_present: bool,
        limits: SessionLimits,
        acl: Acl,
        methods: Arc<dyn sasl::Methods>,
        now: Instant,
    ) -> Session {
        state.expiry = request.session_expiry;
        let send_window = usize::from(request.client_receive_maximum.min(limits.max_inflight).max(1));
        let mut session = Session {
            version: request.version,
            client_id: request.client_id.clone(),
            keep_alive: Duration::from_secs(request.keep_alive.into()),
            last_received: now,
            send_window,
            client_max_packet_size: request.client_max_packet_size,
            client_topic_alias_maximum: request.client_topic_alias_maximum.min(limits.max_outgoing_topic_aliases),
            outgoing_aliases: HashMap::new(),
            incoming_aliases: HashMap::new(),
            next_packet_id: 0,
            send_sequence: 0,
            shared_unacked: VecDeque::new(),
            pending: VecDeque::new(),
            will: request.will.clone().filter(|w| {
                let allowed = acl.may_publish(&w.topic);
                if !allowed {
                    tracing::info!(client_id = %request.client_id, topic = %w.topic, "will not accepted: topic not authorized");
                }
                allowed
            }),
            acl: SessionAcl::new(acl),
            pending_retained_bytes: 0,
            refused_publishes: (0, None),
            problem_information: request.problem_information,
            out: BytesMut::new(),
            actions: VecDeque::new(),
            close: None,
            reauth: request
                .auth_method
                .clone()
                .zip(request.verified_user.clone())
                .map(|(method, user)| Box::new(Reauthentication { method, user, methods, exchange: None })),
            limits,
            state,
        };
        session.send(Packet::ConnAck(session.connack(&request, session_present)));
        session.resend_inflight(now);
        session
    }

    fn connack(&self, request: &ConnectRequest, session_present: bool) -> v5::ConnAck {
        let props = v5::ConnAckProperties {
            authentication_method: request.auth_method.clone(),
            authentication_data: request.auth_method.as_ref().and(request.auth_data.clone()),
            session_expiry_interval: request
                .session_expiry_capped
                .then(|| request.session_expiry.as_secs().min(u64::from(u32::MAX - 1)) as u32),
            receive_max: Some(self.limits.receive_maximum),
            max_packet_size: Some(self.limits.max_packet_size.min(u32::MAX as usize) as u32),
            assigned_client_identifier: request.assigned_client_id.then(|| request.client_id.clone()),
            topic_alias_max: Some(self.limits.topic_alias_maximum),
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive: request.keep_alive_capped.then_some(request.keep_alive),
            ..v5::ConnAckProperties::new()
        };
        v5::ConnAck { session_present, code: v5::ConnectReturnCode::Success, properties: Some(props) }
    }

    /// Puts new permissions in force (after the authorization state changed): cached read
    /// decisions are dropped, subscriptions they no longer allow are removed, and a will on a
    /// topic no longer writable is discarded.
    pub fn set_acl(&mut self, acl: Acl) {
        self.acl.replace(acl);
        if self.will.as_ref().is_some_and(|w| !self.acl.acl().may_publish(&w.topic)) {
            tracing::info!(client_id = %self.client_id, "will discarded: its topic is no longer authorized");
            self.will = None;
        }
        let limits = self.limits.topics;
        let acl = self.acl.acl();
        let denied: Vec<String> = (self.state.subscriptions.keys())
            .filter(|f| topic::parse_filter(f, limits).is_ok_and(|parsed| !acl.may_subscribe(parsed.filter)))
            .cloned()
            .collect();
        for filter in denied {
            tracing::info!(client_id = %self.client_id, %filter, "subscription removed: no longer authorized");
            self.state.subscriptions.remove(&filter);
            self.actions.push_back(Action::Unsubscribe { filter });
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The session state (its subscriptions, messages in flight), for the broker work in
    /// [`Action`]s; only the session changes it while it is live.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// Encoded bytes waiting to be written to the client.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Whether broker work is waiting.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The next piece of broker work.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Set once the connection must end; the driver writes the output, then closes.
    pub fn close_reason(&self) -> Option<&Close> {
        self.close.as_ref()
    }

    /// Whether another QoS 1/2 message may be sent now.
    pub fn can_send(&self) -> bool {
        self.close.is_none() && self.state.inflight.len() < self.send_window
    }

    /// When [`Session::tick`] must run next (keep alive, shared-group acknowledgement timeout).
    pub fn deadline(&self) -> Option<Instant> {
        let keep_alive = (!self.keep_alive.is_zero()).then(|| self.last_received + self.keep_alive.mul_f32(1.5));
        let shared = self.shared_unacked.front().map(|(sent, _, _)| *sent + self.limits.shared_ack_timeout);
        keep_alive.into_iter().chain(shared).min()
    }

    /// Enforces the keep alive (1.5 times the interval without a packet closes the connection)
    /// and hands shared-group messages unacknowledged for `shared_ack_timeout` to another member
    /// (the copy in flight here stays: the client may still acknowledge it).
    pub fn tick(&mut self, now: Instant) {
        if !self.keep_alive.is_zero() && now >= self.last_received + self.keep_alive.mul_f32(1.5) {
            self.fail(Reason::KeepAliveTimeout, format!("no packet within 1.5 x keep alive ({:?})", self.keep_alive));
        }
        while let Some(&(sent, pkid, sequence)) = self.shared_unacked.front() {
            if now < sent + self.limits.shared_ack_timeout {
                break;
            }
            self.shared_unacked.pop_front();
            if let Some((seq, Inflight::Publish(delivery))) = self.state.inflight.get_mut(&pkid) {
                if *seq == sequence {
                    let shared = delivery.shared.take();
                    let delivery = Delivery { shared, ..delivery.clone() };
                    self.actions.push_back(Action::Redispatch { delivery, reason: RedispatchReason::AckTimeout });
                }
            }
        }
    }

    /// The broker ends the connection (takeover, shutdown, administrative action). After an
    /// administrative action (0x98: revoked, disabled, kicked) the will is not published.
    pub fn kick(&mut self, reason: Reason, detail: impl Into<String>) {
        if self.close.is_none() {
            self.fail(reason, detail.into());
            if reason == Reason::AdministrativeAction {
                if let Some(close) = &mut self.close {
                    close.publish_will = false;
                }
            }
        }
    }

    /// The transport failed or the client vanished without DISCONNECT.
    pub fn lost(&mut self, detail: impl Into<String>) {
        if self.close.is_none() {
            self.close = Some(Close { reason: Reason::UnspecifiedError, detail: detail.into(), publish_will: true });
        }
    }

    /// Ends the session state machine: returns the session state and the will to publish, if any.
    pub fn finish(mut self) -> (SessionState, Option<Will>) {
        let publish_will = self.close.as_ref().is_none_or(|c| c.publish_will);
        let will = self.will.take().filter(|_| publish_will);
        (self.state, will)
    }

    /// Decodes and handles every complete packet in `input`.
    pub fn handle_input(&mut self, input: &mut BytesMut, now: Instant) {
        while self.close.is_none() {
            match codec::decode(self.version, input, self.limits.max_packet_size) {
                Ok(Some(packet)) => {
                    self.last_received = now;
                    self.handle_packet(packet, now);
                }
                Ok(None) => break,
                Err(e) => {
                    match e {
                        codec::DecodeError::TooLarge { .. } => metrics::oversized_packet(),
                        _ => metrics::malformed_packet(),
                    }
                    self.fail(e.reason_code(), e.to_string());
                }
            }
        }
    }

    fn handle_packet(&mut self, packet: Packet, now: Instant) {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish, now),
            Packet::PubAck(ack) => self.on_puback(ack.pkid, ack.reason as u8),
            Packet::PubRec(rec) => self.on_pubrec(rec),
            Packet::PubRel(rel) => self.on_pubrel(rel.pkid),
            Packet::PubComp(comp) => self.on_pubcomp(comp.pkid),
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe),
            Packet::PingReq => self.send(Packet::PingResp),
            Packet::Disconnect(disconnect) => self.on_disconnect(disconnect),
            Packet::Connect(_) => self.fail(Reason::ProtocolError, "second CONNECT on one connection".into()),
            Packet::Auth(auth) => self.on_auth(auth),
            other => self.fail(Reason::ProtocolError, format!("a client must not send {}", other.name())),
        }
    }

    /// One step of re-authentication: AUTH 0x19 starts it, AUTH 0x18 goes on with it, and the
    /// session's user verified again is confirmed with AUTH 0x00.
    fn on_auth(&mut self, auth: Auth) {
        let Some(reauth) = self.reauth.as_mut() else {
            return self.fail(Reason::ProtocolError, "AUTH without an authentication method in CONNECT".into());
        };
        if auth.method.as_deref() != Some(reauth.method.as_str()) {
            return self.fail(Reason::ProtocolError, "AUTH with another authentication method than CONNECT's".into());
        }
        let step = match (auth.reason, reauth.exchange.take()) {
            (AuthReason::ReAuthenticate, None) => {
                let first = auth.data.unwrap_or_default();
                (reauth.methods.start(&reauth.method)).and_then(|server| AuthExchange::start(&reauth.method, server, &first))
            }
            (AuthReason::ContinueAuthentication, Some(mut exchange)) => exchange.on_auth(auth).map(|step| (exchange, step)),
            _ => return self.fail(Reason::ProtocolError, "AUTH out of sequence".into()),
        };
        match step {
            Ok((exchange, Exchanged::Continue(challenge))) => {
                reauth.exchange = Some(exchange);
                self.send(Packet::Auth(challenge));
            }
            Ok((_, Exchanged::Verified { user, data })) if user == reauth.user => {
                let confirmed = auth_packet(AuthReason::Success, &reauth.method, data);
                self.send(Packet::Auth(confirmed));
            }
            Ok((_, Exchanged::Verified { user, .. })) => {
                self.fail(Reason::NotAuthorized, format!("re-authentication failed: verified {user:?}, not the session's user"))
            }
            Err(refusal) => self.fail(Reason::NotAuthorized, format!("re-authentication failed: {}", refusal.reason)),
        }
    }

    fn on_publish(&mut self, mut publish: v5::Publish, now: Instant) {
        let mut props = publish.properties.take().unwrap_or_else(no_properties);
        if let Some(alias) = props.topic_alias.take() {
            if alias == 0 || alias > self.limits.topic_alias_maximum {
                return self
                    .fail(Reason::TopicAliasInvalid, format!("topic alias {alias} is outside 1..={}", self.limits.topic_alias_maximum));
            }
            if publish.topic.is_empty() {
                match self.incoming_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return self.fail(Reason::ProtocolError, format!("topic alias {alias} used before it was set")),
                }
            } else {
                self.incoming_aliases.insert(alias, publish.topic.clone());
            }
        }
        if publish.topic.is_empty() && self.version == ProtocolVersion::V5 {
            return self.fail(Reason::ProtocolError, "PUBLISH with an empty topic and no topic alias".into());
        }
        if let Err(e) = topic::validate_name(&publish.topic, self.limits.topics) {
            return self.fail(Reason::TopicNameInvalid, format!("PUBLISH topic {:?}: {e}", publish.topic));
        }
        if !props.subscription_identifiers.is_empty() {
            return self.fail(Reason::ProtocolError, "a client must not send subscription identifiers in PUBLISH".into());
        }
        metrics::message_in(publish.qos);
        if publish.qos == QoS::ExactlyOnce {
            if self.state.awaiting_pubrel.contains(&publish.pkid) {
                // A re-sent QoS 2 message we already routed: acknowledge it again only.
                return self.send(Packet::PubRec(v5::PubRec::new(publish.pkid)));
            }
            if self.version == ProtocolVersion::V5 && self.state.awaiting_pubrel.len() >= usize::from(self.limits.receive_maximum) {
                return self
                    .fail(Reason::ReceiveMaximumExceeded, format!("more than {} QoS 2 messages unreleased", self.limits.receive_maximum));
            }
        }
        if !self.acl.acl().may_publish(&publish.topic) {
            self.log_refused_publish(&publish.topic, now);
            if self.version == ProtocolVersion::V311 && self.limits.v3_unauthorized_publish == UnauthorizedPublish::Drop {
                metrics::dropped(DropReason::NotAuthorized);
                return self.acknowledge(publish.qos, publish.pkid);
            }
            return self.refuse_publish(
                (publish.qos, publish.pkid, &publish.topic),
                Reason::NotAuthorized,
                DropReason::NotAuthorized,
                "not authorized to publish to this topic",
            );
        }
        if props.payload_format_indicator == Some(1) && std::str::from_utf8(&publish.payload).is_err() {
            return self.refuse_publish(
                (publish.qos, publish.pkid, &publish.topic),
                Reason::PayloadFormatInvalid,
                DropReason::Refused,
                "payload is not UTF-8 as its format indicator says",
            );
        }
        let (qos, pkid, retain) = (publish.qos, publish.pkid, publish.retain);
        let held = retain.then(|| HeldAck { qos, pkid, topic: publish.topic.clone() });
        let expires_at = props.message_expiry_interval.take().map(|s| now + Duration::from_secs(s.into()));
        let message = Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: Some(props).filter(has_passthrough),
            expires_at,
            publisher: Some(self.state.id),
            id: None,
        };
        self.actions.push_back(Action::Publish(message, held));
        if !retain {
            self.acknowledge(qos, pkid);
        } else if qos == QoS::ExactlyOnce {
            // A re-sent copy arriving before the answer is recognised as one.
            self.state.awaiting_pubrel.insert(pkid);
        }
    }

    /// The broker's answer to a retained PUBLISH: taken (acknowledged now), or refused by the
    /// publisher's retained quota (`over_quota`: PUBACK/PUBREC 0x97 in MQTT 5; MQTT 3.1.1,
    /// which has no reason codes, closes the connection).
    pub fn retained_published(&mut self, held: HeldAck, over_quota: Option<RetainedLimit>) {
        let Some(limit) = over_quota else {
            return match held.qos {
                QoS::ExactlyOnce => self.send(Packet::PubRec(v5::PubRec::new(held.pkid))),
                qos => self.acknowledge(qos, held.pkid),
            };
        };
        self.state.awaiting_pubrel.remove(&held.pkid);
        let detail = match limit {
            RetainedLimit::ClientBytes => "retained quota reached (limits.max_retained_bytes_per_client)",
            _ => "retained quota reached (limits.max_retained_per_client)",
        };
        tracing::info!(client_id = %self.client_id, topic = %held.topic, "retained PUBLISH refused: {detail}");
        self.refuse_publish((held.qos, held.pkid, &held.topic), Reason::QuotaExceeded, DropReason::Refused, detail);
    }

    /// Logs an unauthorized PUBLISH: the first at once, then at most one line per
    /// [`REFUSAL_LOG_INTERVAL`] with the number refused meanwhile.
    fn log_refused_publish(&mut self, topic: &str, now: Instant) {
        let (count, last) = &mut self.refused_publishes;
        *count += 1;
        if last.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL) {
            tracing::info!(client_id = %self.client_id, %topic, refused = *count, "PUBLISH not authorized");
            *count = 0;
            *last = Some(now);
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2, then waiting for PUBREL) for an accepted PUBLISH.
    fn acknowledge(&mut self, qos: QoS, pkid: u16) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(v5::PubAck::new(pkid))),
            QoS::ExactlyOnce => {
                self.state.awaiting_pubrel.insert(pkid);
                self.send(Packet::PubRec(v5::PubRec::new(pkid)));
            }
        }
    }

    /// Answers a QoS 1/2 PUBLISH that is not accepted with a failure reason (MQTT 5) or closes (3.1.1).
    fn refuse_publish(&mut self, (qos, pkid, topic): (QoS, u16, &str), reason: Reason, counted_as: DropReason, detail: &str) {
        metrics::dropped(counted_as);
        let code = reason as u8;
        match (self.version, qos) {
            (ProtocolVersion::V311, _) => self.fail(reason, format!("PUBLISH to {topic:?}: {detail}")),
            (ProtocolVersion::V5, QoS::AtMostOnce) => {}
            (ProtocolVersion::V5, QoS::AtLeastOnce) => {
                let mut ack = v5::PubAck::new(pkid);
                ack.reason = puback_reason(code);
                ack.properties =
                    self.reason_string(detail).map(|r| v5::PubAckProperties { reason_string: Some(r), user_properties: Vec::new() });
                self.send(Packet::PubAck(ack));
            }
            (ProtocolVersion::V5, QoS::ExactlyOnce) => {
                let mut rec = v5::PubRec::new(pkid);
                rec.reason = pubrec_reason(code);
                rec.properties =
                    self.reason_string(detail).map(|r| v5::PubRecProperties { reason_string: Some(r), user_properties: Vec::new() });
                self.send(Packet::PubRec(rec));
            }
        }
    }

    fn reason_string(&self, detail: &str) -> Option<String> {
        self.problem_information.then(|| detail.to_string())
    }

    fn on_puback(&mut self, pkid: u16, reason: u8) {
        if let Some((_, Inflight::Publish(d))) = self.state.inflight.get(&pkid) {
            if d.qos == QoS::AtLeastOnce {
                self.acknowledged(pkid, reason >= 0x80);
            }
        }
    }

    /// The client acknowledged (or, `refused`, rejected with an MQTT 5 reason code of 0x80 or
    /// more) the message in flight under `pkid`: it is done here; a refused shared-group message
    /// goes to another member.
    fn acknowledged(&mut self, pkid: u16, refused: bool) {
        if let Some((_, Inflight::Publish(delivery))) = self.state.inflight.remove(&pkid) {
            if refused && delivery.shared.is_some() {
                self.actions.push_back(Action::Redispatch { delivery, reason: RedispatchReason::Refused });
            }
        }
    }

    fn on_pubrec(&mut self, rec: v5::PubRec) {
        let known = matches!(self.state.inflight.get(&rec.pkid), Some((_, Inflight::Publish(d))) if d.qos == QoS::ExactlyOnce);
        let failed = (rec.reason as u8) >= 0x80;
        if known && failed {
            self.acknowledged(rec.pkid, true);
            return;
        }
        let mut rel = v5::PubRel::new(rec.pkid);
        match self.state.inflight.get_mut(&rec.pkid) {
            Some(entry) if known || matches!(entry.1, Inflight::Released) => entry.1 = Inflight::Released,
            _ => rel.reason = v5::PubRelReason::PacketIdentifierNotFound,
        }
        self.send(Packet::PubRel(rel));
    }

    fn on_pubrel(&mut self, pkid: u16) {
        let mut comp = v5::PubComp::new(pkid);
        if !self.state.awaiting_pubrel.remove(&pkid) {
            comp.reason = v5::PubCompReason::PacketIdentifierNotFound;
        }
        self.send(Packet::PubComp(comp));
    }

    fn on_pubcomp(&mut self, pkid: u16) {
        if matches!(self.state.inflight.get(&pkid), Some((_, Inflight::Released))) {
            self.state.inflight.remove(&pkid);
        }
    }

    fn on_subscribe(&mut self, subscribe: v5::Subscribe) {
        let subscription_id = subscribe.properties.as_ref().and_then(|p| p.id);
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        for f in subscribe.filters {
            let parsed = match topic::parse_filter(&f.path, self.limits.topics) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::debug!(client_id = %self.client_id, filter = %f.path, error = %e, "subscription refused");
                    codes.push(v5::SubscribeReasonCode::TopicFilterInvalid);
                    continue;
                }
            };
            if parsed.share_group.is_some() && f.nolocal {
                return self.fail(Reason::ProtocolError, format!("No Local on shared subscription {:?}", f.path));
            }
            if !self.acl.acl().may_subscribe(parsed.filter) {
                tracing::info!(client_id = %self.client_id, filter = %f.path, "subscription not authorized");
                codes.push(v5::SubscribeReasonCode::NotAuthorized);
                continue;
            }
            let is_new = !self.state.subscriptions.contains_key(&f.path);
            if is_new && self.state.subscriptions.len() >= self.limits.max_subscriptions {
                tracing::info!(client_id = %self.client_id, filter = %f.path, limit = self.limits.max_subscriptions, "subscription refused: too many");
                metrics::client_limit_refusal(metrics::ClientLimit::Subscriptions);
                codes.push(v5::SubscribeReasonCode::QuotaExceeded);
                continue;
            }
            // MQTT 5 Retain Handling; a shared subscription never gets retained messages.
            let with_retained = match (parsed.share_group, f.retain_forward_rule) {
                (Some(_), _) | (_, v5::RetainForwardRule::Never) => false,
                (None, v5::RetainForwardRule::OnNewSubscribe) => is_new,
                (None, v5::RetainForwardRule::OnEverySubscribe) => true,
            };
            let options = SubscriptionOptions { qos: f.qos, no_local: f.nolocal, retain_as_published: f.preserve_retain, subscription_id };
            codes.push(granted(f.qos));
            self.state.subscriptions.insert(f.path.clone(), options.clone());
            self.actions.push_back(Action::Subscribe { filter: f.path, options, is_new, with_retained });
        }
        self.send(Packet::SubAck(v5::SubAck { pkid: subscribe.pkid, return_codes: codes, properties: None }));
    }

    fn on_unsubscribe(&mut self, unsubscribe: v5::Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in unsubscribe.filters {
            let reason = if topic::parse_filter(&filter, self.limits.topics).is_err() {
                v5::UnsubAckReason::TopicFilterInvalid
            } else if self.state.subscriptions.remove(&filter).is_some() {
                self.actions.push_back(Action::Unsubscribe { filter });
                v5::UnsubAckReason::Success
            } else {
                v5::UnsubAckReason::NoSubscriptionExisted
            };
            reasons.push(reason);
        }
        self.send(Packet::UnsubAck(v5::UnsubAck { pkid: unsubscribe.pkid, reasons, properties: None }));
    }

    fn on_disconnect(&mut self, disconnect: v5::Disconnect) {
        if let Some(expiry) = disconnect.properties.as_ref().and_then(|p| p.session_expiry_interval) {
            if self.state.expiry.is_zero() && expiry != 0 {
                return self.fail(Reason::ProtocolError, "DISCONNECT sets a session expiry after CONNECT set none".into());
            }
            let requested = if expiry == u32::MAX { self.limits.max_session_expiry } else { Duration::from_secs(expiry.into()) };
            self.state.expiry = requested.min(self.limits.max_session_expiry);
        }
        let publish_will = disconnect.reason_code == Reason::DisconnectWithWillMessage;
        self.close = Some(Close { reason: disconnect.reason_code, detail: "client disconnected".into(), publish_will });
    }

    /// Queues retained messages found for a new subscription; they are sent after its SUBACK.
    /// Messages beyond `max_retained_replay_bytes` waiting to be sent are dropped (counted).
    pub fn queue_retained(&mut self, deliveries: impl IntoIterator<Item = Delivery>) {
        for delivery in deliveries {
            let size = delivery.message.topic.len() + delivery.message.payload.len();
            if self.pending_retained_bytes + size > self.limits.max_retained_replay_bytes {
                metrics::dropped(DropReason::RetainedReplayLimit);
                continue;
            }
            self.pending_retained_bytes += size;
            self.pending.push_back(delivery);
        }
    }

    /// Takes the next message the session itself queued (retained messages).
    pub fn take_pending(&mut self) -> Option<Delivery> {
        let delivery = self.pending.pop_front()?;
        self.pending_retained_bytes -= delivery.message.topic.len() + delivery.message.payload.len();
        Some(delivery)
    }

    /// Sends one message to the client — if the client may read its topic now (every message
    /// passes this check, whatever subscription matched it). Call only while
    /// [`Session::can_send`] is true.
    pub fn deliver(&mut self, delivery: Delivery, now: Instant) {
        if delivery.message.is_expired(now) {
            metrics::dropped(DropReason::Expired);
            return;
        }
        if !self.acl.may_read(&delivery.message.topic) {
            self.not_readable(delivery);
            return;
        }
        let pkid = match delivery.qos {
            QoS::AtMostOnce => 0,
            _ => self.allocate_packet_id(),
        };
        if self.send_publish(&delivery, pkid, false, now) && pkid != 0 {
            self.send_sequence += 1;
            if delivery.shared.is_some() && !self.limits.shared_ack_timeout.is_zero() {
                self.shared_unacked.push_back((now, pkid, self.send_sequence));
            }
            self.state.inflight.insert(pkid, (self.send_sequence, Inflight::Publish(delivery)));
        }
    }

    /// A message the client may not read is not sent: dropped and counted, or, for a shared
    /// group, handed back for a member that may read it.
    fn not_readable(&mut self, delivery: Delivery) {
        match delivery.shared {
            Some(_) => self.actions.push_back(Action::Redispatch { delivery, reason: RedispatchReason::Refused }),
            None => metrics::dropped(DropReason::ReadNotAuthorized),
        }
    }

    /// The topic alias to use for `topic` (MQTT 5), and whether the topic itself must be sent.
    fn topic_alias(&mut self, topic: &str, dup: bool) -> (Option<u16>, bool) {
        if self.version != ProtocolVersion::V5 || dup || self.client_topic_alias_maximum == 0 {
            return (None, true);
        }
        if let Some(&alias) = self.outgoing_aliases.get(topic) {
            return (Some(alias), false);
        }
        if self.outgoing_aliases.len() < usize::from(self.client_topic_alias_maximum) {
            let alias = self.outgoing_aliases.len() as u16 + 1;
            self.outgoing_aliases.insert(topic.to_string(), alias);
            return (Some(alias), true);
        }
        (None, true)
    }

    /// Encodes a PUBLISH for `delivery`; a message larger than the client accepts is dropped
    /// (MQTT 5 3.1.2.25). Returns whether it was written.
    fn send_publish(&mut self, delivery: &Delivery, pkid: u16, dup: bool, now: Instant) -> bool {
        let message = &delivery.message;
        let (alias, send_topic) = self.topic_alias(&message.topic, dup);
        let expiry = message.expires_at.map(|at| at.saturating_duration_since(now).as_secs().max(1) as u32);
        let properties = if message.properties.is_none() && alias.is_none() && expiry.is_none() && delivery.subscription_ids.is_empty() {
            None
        } else {
            let mut props = message.properties.clone().unwrap_or_else(no_properties);
            props.subscription_identifiers.clone_from(&delivery.subscription_ids);
            props.message_expiry_interval = expiry;
            props.topic_alias = alias;
            Some(props)
        };
        let header = codec::PublishHeader { dup, qos: delivery.qos, retain: delivery.retain, pkid };
        let topic = if send_topic { message.topic.as_str() } else { "" };
        let written = codec::encode_publish(
            self.version,
            header,
            topic,
            properties.as_ref(),
            &message.payload,
            &mut self.out,
            self.client_max_packet_size,
        );
        match written {
            Ok(_) => {
                metrics::message_out(delivery.qos);
                true
            }
            Err(e) => {
                tracing::debug!(client_id = %self.client_id, error = %e, "message not sent");
                metrics::dropped(DropReason::TooLargeForClient);
                false
            }
        }
    }

    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            if !self.state.inflight.contains_key(&self.next_packet_id) {
                return self.next_packet_id;
            }
        }
    }

    /// Re-sends everything in flight, oldest first: PUBLISH with DUP (if still readable), or PUBREL.
    fn resend_inflight(&mut self, now: Instant) {
        let mut inflight: Vec<(u16, u64, Inflight)> = self.state.inflight.iter().map(|(&id, (seq, f))| (id, *seq, f.clone())).collect();
        inflight.sort_by_key(|e| e.1);
        for (pkid, seq, entry) in inflight {
            self.send_sequence = self.send_sequence.max(seq);
            match entry {
                Inflight::Publish(delivery) => {
                    if !self.acl.may_read(&delivery.message.topic) {
                        self.state.inflight.remove(&pkid);
                        self.not_readable(delivery);
                    } else if !self.send_publish(&delivery, pkid, true, now) {
                        self.state.inflight.remove(&pkid);
                    } else if delivery.shared.is_some() && !self.limits.shared_ack_timeout.is_zero() {
                        self.shared_unacked.push_back((now, pkid, seq));
                    }
                }
                Inflight::Released => self.send(Packet::PubRel(v5::PubRel::new(pkid))),
            }
        }
    }

    fn send(&mut self, packet: Packet) {
        if let Err(e) = codec::encode(self.version, &packet, &mut self.out, self.client_max_packet_size) {
            tracing::warn!(client_id = %self.client_id, error = %e, packet = packet.name(), "could not encode packet");
        }
    }

    /// Ends the connection because of an error: MQTT 5 clients get a DISCONNECT with the reason
    /// (MQTT 3.1.1 has no server DISCONNECT: the connection is just closed).
    fn fail(&mut self, reason: Reason, detail: String) {
        tracing::info!(client_id = %self.client_id, reason = ?reason, %detail, "closing connection");
        self.close = Some(Close { reason, detail: detail.clone(), publish_will: true });
        if self.version != ProtocolVersion::V5 {
            return;
        }
        let mut disconnect = v5::Disconnect::new();
        disconnect.reason_code = reason;
        disconnect.properties = self.reason_string(&detail).map(|r| v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(r),
            user_properties: Vec::new(),
            server_reference: None,
        });
        self.send(Packet::Disconnect(disconnect));
    }
}

/// PUBLISH properties with nothing set.
fn no_properties() -> v5::PublishProperties {
    v5::PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    }
}

fn has_passthrough(props: &v5::PublishProperties) -> bool {
    *props != no_properties()
}

fn granted(qos: QoS) -> v5::SubscribeReasonCode {
    match qos {
        QoS::AtMostOnce => v5::SubscribeReasonCode::QoS0,
        QoS::AtLeastOnce => v5::SubscribeReasonCode::QoS1,
        QoS::ExactlyOnce => v5::SubscribeReasonCode::QoS2,
    }
}

fn puback_reason(code: u8) -> v5::PubAckReason {
    match code {
        0x87 => v5::PubAckReason::NotAuthorized,
        0x90 => v5::PubAckReason::TopicNameInvalid,
        0x97 => v5::PubAckReason::QuotaExceeded,
        0x99 => v5::PubAckReason::PayloadFormatInvalid,
        _ => v5::PubAckReason::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> v5::PubRecReason {
    match code {
        0x87 => v5::PubRecReason::NotAuthorized,
        0x90 => v5::PubRecReason::TopicNameInvalid,
        0x97 => v5::PubRecReason::QuotaExceeded,
        0x99 => v5::PubRecReason::PayloadFormatInvalid,
        _ => v5::PubRecReason::UnspecifiedError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::policy::Owner;
    use crate::broker::message::SharedDelivery;
    use crate::mqtt::auth_exchange::tests::knock_methods;
    use crate::mqtt::connect;
    use bytes::Bytes;
    use std::sync::Arc;

    fn blank_state() -> SessionState {
        SessionState::new(1, Owner::Anonymous, 10)
    }

    /// A session started for a CONNECT with the given properties and permissions, with the CONNACK already read.
    fn start_with(version: ProtocolVersion, props: Option<v5::ConnectProperties>, acl: Acl) -> Session {
        let mut connect = v5::Connect::new("c1");
        connect.keep_alive = 10;
        connect.properties = props;
        let request = connect::validate(version, connect, &SessionLimits::default(), || unreachable!()).unwrap();
        let mut session = Session::start(request, blank_state(), false, SessionLimits::default(), acl, knock_methods(), Instant::now());
        match read(&mut session, version).as_slice() {
            [Packet::ConnAck(ack)] => assert_eq!(ack.code, v5::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        session
    }

    fn start(version: ProtocolVersion, props: Option<v5::ConnectProperties>) -> Session {
        start_with(version, props, Acl::allow_all())
    }

    fn props(receive_maximum: Option<u16>, topic_alias_max: Option<u16>) -> v5::ConnectProperties {
        v5::ConnectProperties { receive_maximum, topic_alias_max, ..connect::tests::no_properties() }
    }

    /// A v5 session whose CONNECT verified `user` with an AUTH exchange of the KNOCK method.
    fn knocked_in(user: &str) -> Session {
        let mut p = props(None, None);
        p.authentication_method = Some("KNOCK".into());
        let mut connect = v5::Connect::new("c1");
        connect.properties = Some(p);
        let mut request = connect::validate(ProtocolVersion::V5, connect, &SessionLimits::default(), || unreachable!()).unwrap();
        request.verified_user = Some(user.into());
        let mut session =
            Session::start(request, blank_state(), false, SessionLimits::default(), Acl::allow_all(), knock_methods(), Instant::now());
        read(&mut session, ProtocolVersion::V5);
        session
    }

    fn auth(reason: AuthReason, method: &str, data: &str) -> Packet {
        Packet::Auth(auth_packet(reason, method, data.as_bytes().to_vec()))
    }

    #[test]
    fn re_authentication_verifies_the_same_user_again() {
        let mut session = knocked_in("dev");
        feed(&mut session, ProtocolVersion::V5, &[auth(AuthReason::ReAuthenticate, "KNOCK", "dev:2")]);
        assert_eq!(read(&mut session, ProtocolVersion::V5), [auth(AuthReason::ContinueAuthentication, "KNOCK", "prove")]);
        feed(&mut session, ProtocolVersion::V5, &[auth(AuthReason::ContinueAuthentication, "KNOCK", "secret")]);
        assert_eq!(read(&mut session, ProtocolVersion::V5), [auth(AuthReason::Success, "KNOCK", "welcome")]);
        assert!(session.close_reason().is_none() && !session.has_actions());
        feed(&mut session, ProtocolVersion::V5, &[auth(AuthReason::ReAuthenticate, "KNOCK", "dev:3")]);
        assert_eq!(read(&mut session, ProtocolVersion::V5).len(), 1, "and again, as often as the client likes");
    }

    #[test]
    fn re_authentication_as_another_user_or_with_a_wrong_answer_ends_the_session() {
        let mut other = knocked_in("dev");
        feed(&mut other, ProtocolVersion::V5, &[auth(AuthReason::ReAuthenticate, "KNOCK", "admin:1")]);
        feed(&mut other, ProtocolVersion::V5, &[auth(AuthReason::ContinueAuthentication, "KNOCK", "secret")]);
        let close = other.close_reason().unwrap();
        assert_eq!(close.reason, Reason::NotAuthorized);
        assert!(close.detail.contains("verified \"admin\", not the session's user"), "{}", close.detail);
        let mut wrong = knocked_in("dev");
        feed(&mut wrong, ProtocolVersion::V5, &[auth(AuthReason::ReAuthenticate, "KNOCK", "dev:1")]);
        feed(&mut wrong, ProtocolVersion::V5, &[auth(AuthReason::ContinueAuthentication, "KNOCK", "guess")]);
        assert_eq!(wrong.close_reason().map(|c| c.reason), Some(Reason::NotAuthorized));
    }

    #[test]
    fn auth_out_of_sequence_or_with_another_method_is_a_protocol_error() {
        let cases: [&[Packet]; 4] = [
            &[auth(AuthReason::ContinueAuthentication, "KNOCK", "secret")],
            &[auth(AuthReason::ReAuthenticate, "KNOCK", "dev:1"), auth(AuthReason::ReAuthenticate, "KNOCK", "dev:1")],
            &[auth(AuthReason::Success, "KNOCK", "")],
            &[auth(AuthReason::ReAuthenticate, "SCRAM-SHA-256", "n,,n=dev,r=x")],
        ];
        for packets in cases {
            let mut session = knocked_in("dev");
            feed(&mut session, ProtocolVersion::V5, packets);
            assert_eq!(session.close_reason().map(|c| c.reason), Some(Reason::ProtocolError), "{packets:?}");
        }
        let mut plain = start(ProtocolVersion::V5, None);
        feed(&mut plain, ProtocolVersion::V5, &[auth(AuthReason::ReAuthenticate, "KNOCK", "dev:1")]);
        assert_eq!(plain.close_reason().map(|c| c.reason), Some(Reason::ProtocolError), "no method in CONNECT");
    }

    /// Feeds client packets to the session.
    fn feed(session: &mut Session, version: ProtocolVersion, packets: &[Packet]) {
        let mut input = BytesMut::new();
        for p in packets {
            codec::encode(version, p, &mut input, None).unwrap();
        }
        session.handle_input(&mut input, Instant::now());
    }

    /// Decodes and drains what the session wrote.
    fn read(session: &mut Session, version: ProtocolVersion) -> Vec<Packet> {
        let mut out = session.output().split();
        let mut packets = Vec::new();
        while let Some(p) = codec::decode(version, &mut out, usize::MAX).unwrap() {
            packets.push(p);
        }
        packets
    }

    fn actions(session: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| session.next_action()).collect()
    }

    fn publish(topic: &str, qos: QoS, pkid: u16) -> v5::Publish {
        let mut p = v5::Publish::new(topic, qos, "x");
        p.pkid = pkid;
        p
    }

    fn delivery(topic: &str, qos: QoS) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: topic.into(),
                payload: Bytes::from_static(b"m"),
                qos,
                retain: false,
                properties: None,
                expires_at: None,
                publisher: None,
                id: None,
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            shared: None,
        }
    }

    #[test]
    fn narrowed_permissions_remove_subscriptions_they_no_longer_allow() {
        let mut session = start(ProtocolVersion::V5, None);
        let mut subscribe = v5::Subscribe::new("devices/a/#", QoS::AtMostOnce);
        subscribe.filters.push(v5::SubscribeFilter::new("devices/b/#".into(), QoS::AtMostOnce));
        subscribe.pkid = 1;
        feed(&mut session, ProtocolVersion::V5, &[Packet::Subscribe(subscribe)]);
        assert_eq!(actions(&mut session).len(), 2);
        let rule = crate::auth::state::Rule {
            access: crate::auth::state::Access::Read,
            topic_regex: None,
            pattern: Some("devices/a/#".into()),
            deny: false,
        };
        session.set_acl(Acl::compile([&rule], "a", "c1").unwrap());
        match actions(&mut session).as_slice() {
            [Action::Unsubscribe { filter }] => assert_eq!(filter, "devices/b/#"),
            other => panic!("expected one unsubscribe, got {other:?}"),
        }
        assert_eq!(session.state().subscriptions.keys().collect::<Vec<_>>(), ["devices/a/#"], "the session's own record says so too");
    }

    fn disconnect_reason(packets: &[Packet]) -> Option<Reason> {
        packets.iter().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason_code),
            _ => None,
        })
    }

    fn rule(access: crate::auth::state::Access, pattern: &str, deny: bool) -> crate::auth::state::Rule {
        crate::auth::state::Rule { access, topic_regex: None, pattern: Some(pattern.into()), deny }
    }

    fn published_topics(packets: &[Packet]) -> Vec<String> {
        packets.iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.topic.clone()) } else { None }).collect()
    }

    #[test]
    fn every_delivery_passes_the_read_check() {
        use crate::auth::state::Access;
        let rules = [rule(Access::Read, "site/#", false), rule(Access::Read, "site/keys", true)];
        let mut s = start_with(ProtocolVersion::V5, None, Acl::compile(&rules, "u", "c1").unwrap());
        let mut subscribe = v5::Subscribe::new("site/#", QoS::AtLeastOnce);
        subscribe.pkid = 1;
        feed(&mut s, ProtocolVersion::V5, &[Packet::Subscribe(subscribe)]);
        assert!(
            matches!(read(&mut s, ProtocolVersion::V5).as_slice(), [Packet::SubAck(a)] if a.return_codes == [v5::SubscribeReasonCode::QoS1])
        );
        for topic in ["site/a", "site/keys", "other/x"] {
            s.deliver(delivery(topic, QoS::AtLeastOnce), Instant::now());
        }
        s.queue_retained([delivery("site/keys", QoS::AtMostOnce), delivery("site/b", QoS::AtMostOnce)]);
        while let Some(d) = s.take_pending() {
            s.deliver(d, Instant::now());
        }
        assert_eq!(published_topics(&read(&mut s, ProtocolVersion::V5)), ["site/a", "site/b"]);
        s.set_acl(Acl::compile(&[rule(Access::Read, "other/#", false)], "u", "c1").unwrap());
        s.deliver(delivery("site/a", QoS::AtMostOnce), Instant::now());
        s.deliver(delivery("other/x", QoS::AtMostOnce), Instant::now());
        assert_eq!(published_topics(&read(&mut s, ProtocolVersion::V5)), ["other/x"], "the cache follows the new permissions");
    }

    #[test]
    fn an_administrative_kick_suppresses_the_will_and_a_narrowed_acl_discards_it() {
        use crate::auth::state::Access;
        let will = Will {
            topic: "status/c1".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: None,
            message_expiry: None,
            delay: Duration::ZERO,
        };
        for (reason, published) in [(Reason::AdministrativeAction, false), (Reason::SessionTakenOver, true)] {
            let mut s = start(ProtocolVersion::V5, None);
            s.will = Some(will.clone());
            s.kick(reason, "test");
            assert_eq!(s.finish().1.is_some(), published, "{reason:?}");
        }
        let mut s = start(ProtocolVersion::V5, None);
        s.will = Some(will);
        s.set_acl(Acl::compile(&[rule(Access::Write, "other/#", false)], "u", "c1").unwrap());
        s.lost("gone");
        assert!(s.finish().1.is_none(), "the will's topic is no longer writable");
    }

    #[test]
    fn subscriptions_and_retained_replay_are_bounded() {
        let limits = SessionLimits { max_subscriptions: 2, max_retained_replay_bytes: 10, ..SessionLimits::default() };
        let request = connect::validate(ProtocolVersion::V5, v5::Connect::new("c1"), &limits, || unreachable!()).unwrap();
        let mut s = Session::start(request, blank_state(), false, limits, Acl::allow_all(), knock_methods(), Instant::now());
        read(&mut s, ProtocolVersion::V5);
        let mut subscribe = v5::Subscribe::new("a", QoS::AtMostOnce);
        subscribe.filters.push(v5::SubscribeFilter::new("b".into(), QoS::AtMostOnce));
        subscribe.filters.push(v5::SubscribeFilter::new("c".into(), QoS::AtMostOnce));
        subscribe.pkid = 1;
        feed(&mut s, ProtocolVersion::V5, &[Packet::Subscribe(subscribe)]);
        match read(&mut s, ProtocolVersion::V5).as_slice() {
            [Packet::SubAck(a)] => assert_eq!(
                a.return_codes,
                [v5::SubscribeReasonCode::QoS0, v5::SubscribeReasonCode::QoS0, v5::SubscribeReasonCode::QuotaExceeded]
            ),
            other => panic!("{other:?}"),
        }
        // "t" + "m" is 2 bytes: five fit in 10.
        s.queue_retained((0..8).map(|_| delivery("t", QoS::AtMostOnce)));
        assert_eq!(std::iter::from_fn(|| s.take_pending()).count(), 5);
    }

    /// For random rules, filters and topics: a message reaches the client iff its topic
    /// matches the granted filter and the client may read it.
    #[test]
    fn property_delivered_iff_readable() {
        use crate::auth::state::Access;
        let levels = ["a", "b", "c", "$x"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut checked = 0;
        for _ in 0..300 {
            let piece = |wild: bool, next: &mut dyn FnMut(usize) -> usize| -> String {
                let depth = 1 + next(3);
                let mut parts: Vec<String> = (0..depth)
                    .map(|i| match (wild, next(5)) {
                        (true, 0) if i > 0 || next(2) == 0 => "+".to_string(),
                        _ => levels[next(levels.len())].to_string(),
                    })
                    .collect();
                if wild && next(3) == 0 {
                    parts.push("#".into());
                }
                parts.join("/")
            };
            let rules: Vec<crate::auth::state::Rule> = (0..1 + next(4))
                .map(|_| {
                    let pattern = piece(true, &mut next);
                    let regex = next(4) == 0;
                    crate::auth::state::Rule {
                        access: [Access::Read, Access::ReadWrite, Access::Write][next(3)],
                        topic_regex: regex.then(|| pattern.replace('+', "[^/]+").replace('#', ".*").replace('$', "\\$")),
                        pattern: (!regex).then_some(pattern),
                        deny: next(3) == 0,
                    }
                })
                .collect();
            let acl = Acl::compile(&rules, "u", "c1").unwrap();
            let filter = piece(true, &mut next);
            let mut s = start_with(ProtocolVersion::V5, None, acl.clone());
            let mut subscribe = v5::Subscribe::new(&filter, QoS::AtMostOnce);
            subscribe.pkid = 1;
            feed(&mut s, ProtocolVersion::V5, &[Packet::Subscribe(subscribe)]);
            let granted = matches!(read(&mut s, ProtocolVersion::V5).as_slice(), [Packet::SubAck(a)] if a.return_codes == [v5::SubscribeReasonCode::QoS0]);
            for _ in 0..10 {
                let topic = piece(false, &mut next);
                // The broker routes only matching topics of granted subscriptions.
                if !(granted && crate::topic::matches(&filter, &topic)) {
                    continue;
                }
                s.deliver(delivery(&topic, QoS::AtMostOnce), Instant::now());
                let delivered = !published_topics(&read(&mut s, ProtocolVersion::V5)).is_empty();
                assert_eq!(delivered, acl.may_read(&topic), "rules {rules:?} filter {filter} topic {topic}");
                checked += 1;
            }
            let readable_exists = (0..40).map(|_| piece(false, &mut next)).any(|t| crate::topic::matches(&filter, &t) && acl.may_read(&t));
            if readable_exists {
                assert!(granted, "a filter with a readable topic is granted: rules {rules:?} filter {filter}");
            }
        }
        assert!(checked > 100, "only {checked} deliveries checked");
    }

    #[test]
    fn qos1_publish_is_routed_before_its_puback() {
        let mut s = start(ProtocolVersion::V5, None);
        feed(&mut s, ProtocolVersion::V5, &[Packet::Publish(publish("a/b", QoS::AtLeastOnce, 7))]);
        assert!(matches!(actions(&mut s).as_slice(), [Action::Publish(m, None)] if m.topic == "a/b"));
        assert!(matches!(read(&mut s, ProtocolVersion::V5).as_slice(), [Packet::PubAck(a)] if a.pkid == 7));
    }

    #[test]
    fn a_retained_publish_is_acknowledged_once_the_broker_took_it_or_refused_with_0x97() {
        let mut s = start(ProtocolVersion::V5, None);
        let retained = |topic: &str, qos, pkid| {
            let mut p = publish(topic, qos, pkid);
            p.retain = true;
            Packet::Publish(p)
        };
        feed(&mut s, ProtocolVersion::V5, &[retained("a/1", QoS::AtLeastOnce, 1), retained("a/2", QoS::ExactlyOnce, 2)]);
        let held: Vec<HeldAck> = actions(&mut s)
            .into_iter()
            .map(|a| match a {
                Action::Publish(_, Some(held)) => held,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(read(&mut s, ProtocolVersion::V5).is_empty(), "no acknowledgement before the broker's answer");
        // A re-sent copy of the QoS 2 message meanwhile is not routed again.
        let mut again = publish("a/2", QoS::ExactlyOnce, 2);
        (again.retain, again.dup) = (true, true);
        feed(&mut s, ProtocolVersion::V5, &[Packet::Publish(again)]);
        assert!(actions(&mut s).is_empty());
        read(&mut s, ProtocolVersion::V5);
        s.retained_published(held[0].clone(), None);
        s.retained_published(held[1].clone(), Some(RetainedLimit::ClientMessages));
        match read(&mut s, ProtocolVersion::V5).as_slice() {
            [Packet::PubAck(ack), Packet::PubRec(rec)] => {
                assert_eq!((ack.pkid, ack.reason), (1, v5::PubAckReason::Success));
                assert_eq!((rec.pkid, rec.reason), (2, v5::PubRecReason::QuotaExceeded));
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.state.awaiting_pubrel.contains(&2), "a refused QoS 2 message waits for no PUBREL");
    }

    #[test]
    fn qos2_duplicates_are_routed_once_and_unknown_pubrel_is_reported() {
        let mut s = start(ProtocolVersion::V5, None);
        let p = Packet::Publish(publish("a", QoS::ExactlyOnce, 3));
        feed(&mut s, ProtocolVersion::V5, &[p.clone(), p]);
        assert_eq!(actions(&mut s).len(), 1);
        assert!(matches!(read(&mut s, ProtocolVersion::V5).as_slice(), [Packet::PubRec(_), Packet::PubRec(_)]));
        feed(&mut s, ProtocolVersion::V5, &[Packet::PubRel(v5::PubRel::new(3)), Packet::PubRel(v5::PubRel::new(9))]);
        match read(&mut s, ProtocolVersion::V5).as_slice() {
            [Packet::PubComp(a), Packet::PubComp(b)] => {
                assert_eq!((a.pkid, a.reason), (3, v5::PubCompReason::Success));
                assert_eq!((b.pkid, b.reason), (9, v5::PubCompReason::PacketIdentifierNotFound));
            }
            other => panic!("{other:?}"),
        }
        assert!(s.close_reason().is_none());
    }

    #[test]
    fn send_window_follows_the_client_receive_maximum() {
        let mut s = start(ProtocolVersion::V5, Some(props(Some(2), None)));
        s.deliver(delivery("t", QoS::AtLeastOnce), Instant::now());
        s.deliver(delivery("t", QoS::AtLeastOnce), Instant::now());
        assert!(!s.can_send());
        let sent = read(&mut s, ProtocolVersion::V5);
        let Packet::Publish(first) = &sent[0] else { panic!("{sent:?}") };
        feed(&mut s, ProtocolVersion::V5, &[Packet::PubAck(v5::PubAck::new(first.pkid))]);
        assert!(s.can_send());
    }

    fn shared(topic: &str, qos: QoS) -> Delivery {
        let route = "$share/g/t".into();
        Delivery { shared: Some(Box::new(SharedDelivery { route, tried: Vec::new(), passed_on: false })), ..delivery(topic, qos) }
    }

    fn sent_pkids(s: &mut Session) -> Vec<u16> {
        read(s, ProtocolVersion::V5).into_iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.pkid) } else { None }).collect()
    }

    #[test]
    fn a_refused_shared_group_message_is_handed_back_and_a_refused_plain_one_is_not() {
        let mut s = start(ProtocolVersion::V5, None);
        s.deliver(shared("t", QoS::AtLeastOnce), Instant::now());
        s.deliver(delivery("t", QoS::AtLeastOnce), Instant::now());
        s.deliver(shared("t", QoS::ExactlyOnce), Instant::now());
        let pkids = sent_pkids(&mut s);
        let nack = |pkid| v5::PubAck { pkid, reason: v5::PubAckReason::NotAuthorized, properties: None };
        let rec = v5::PubRec { pkid: pkids[2], reason: v5::PubRecReason::QuotaExceeded, properties: None };
        feed(&mut s, ProtocolVersion::V5, &[Packet::PubAck(nack(pkids[0])), Packet::PubAck(nack(pkids[1])), Packet::PubRec(rec)]);
        let handed_back: Vec<(QoS, RedispatchReason)> = (actions(&mut s).into_iter())
            .map(|a| match a {
                Action::Redispatch { delivery, reason } => (delivery.qos, reason),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(handed_back, [(QoS::AtLeastOnce, RedispatchReason::Refused), (QoS::ExactlyOnce, RedispatchReason::Refused)]);
        assert!(s.state().inflight.is_empty(), "refused messages are done here");
    }

    #[test]
    fn a_shared_group_message_the_member_may_not_read_is_handed_back_unsent() {
        let rules = [rule(crate::auth::state::Access::Read, "public/#", false)];
        let mut s = start_with(ProtocolVersion::V5, None, Acl::compile(&rules, "u", "c1").unwrap());
        s.deliver(shared("secret/t", QoS::AtLeastOnce), Instant::now());
        assert!(sent_pkids(&mut s).is_empty(), "not sent to a member without read permission");
        assert!(matches!(actions(&mut s).as_slice(), [Action::Redispatch { reason: RedispatchReason::Refused, .. }]));
    }

    #[test]
    fn a_shared_group_message_unacknowledged_past_the_timeout_is_handed_back_once() {
        let mut s = start(ProtocolVersion::V5, None);
        let timeout = Duration::from_secs(2);
        s.limits.shared_ack_timeout = timeout;
        let now = Instant::now();
        s.deliver(shared("t", QoS::AtLeastOnce), now);
        s.deliver(delivery("t", QoS::AtLeastOnce), now);
        sent_pkids(&mut s);
        assert_eq!(s.deadline(), Some(now + timeout), "the timeout comes before the keep alive");
        s.tick(now + timeout);
        assert!(matches!(actions(&mut s).as_slice(), [Action::Redispatch { reason: RedispatchReason::AckTimeout, .. }]));
        assert_eq!(s.state().inflight.len(), 2, "the copies in flight stay: the client may still acknowledge them");
        s.tick(now + timeout * 2);
        assert!(actions(&mut s).is_empty(), "handed back once");
        assert!(s.close_reason().is_none());
    }

    #[test]
    fn unacknowledged_messages_are_resent_with_dup_on_resume() {
        let mut s = start(ProtocolVersion::V311, None);
        s.deliver(delivery("t", QoS::AtLeastOnce), Instant::now());
        s.deliver(delivery("t", QoS::ExactlyOnce), Instant::now());
        let sent = read(&mut s, ProtocolVersion::V311);
        let Packet::Publish(qos2) = &sent[1] else { panic!("{sent:?}") };
        feed(&mut s, ProtocolVersion::V311, &[Packet::PubRec(v5::PubRec::new(qos2.pkid))]);
        s.lost("test");
        let (state, _) = s.finish();
        let request =
            connect::validate(ProtocolVersion::V311, v5::Connect::new("c1"), &SessionLimits::default(), || unreachable!()).unwrap();
        let mut resumed = Session::start(request, state, true, SessionLimits::default(), Acl::allow_all(), knock_methods(), Instant::now());
        let packets = read(&mut resumed, ProtocolVersion::V311);
        assert!(matches!(&packets[0], Packet::ConnAck(a) if a.session_present));
        assert!(matches!(&packets[1], Packet::Publish(p) if p.dup && p.qos == QoS::AtLeastOnce));
        assert!(matches!(&packets[2], Packet::PubRel(r) if r.pkid == qos2.pkid));
    }

    #[test]
    fn topic_aliases_from_the_client() {
        let mut s = start(ProtocolVersion::V5, None);
        let mut set = publish("long/topic", QoS::AtMostOnce, 0);
        let mut alias_props = no_properties();
        alias_props.topic_alias = Some(1);
        set.properties = Some(alias_props.clone());
        let mut reuse = publish("", QoS::AtMostOnce, 0);
        reuse.properties = Some(alias_props.clone());
        feed(&mut s, ProtocolVersion::V5, &[Packet::Publish(set), Packet::Publish(reuse)]);
        let topics: Vec<String> = actions(&mut s)
            .into_iter()
            .map(|a| match a {
                Action::Publish(m, _) => m.topic.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(topics, ["long/topic", "long/topic"]);

        let mut unknown = publish("", QoS::AtMostOnce, 0);
        alias_props.topic_alias = Some(2);
        unknown.properties = Some(alias_props);
        feed(&mut s, ProtocolVersion::V5, &[Packet::Publish(unknown)]);
        assert_eq!(disconnect_reason(&read(&mut s, ProtocolVersion::V5)), Some(Reason::ProtocolError));
        assert!(s.close_reason().is_some());
    }

    #[test]
    fn outgoing_topic_aliases_within_the_client_maximum() {
        let mut s = start(ProtocolVersion::V5, Some(props(None, Some(1))));
        for topic in ["a", "a", "b"] {
            s.deliver(delivery(topic, QoS::AtMostOnce), Instant::now());
        }
        let sent: Vec<(String, Option<u16>)> = read(&mut s, ProtocolVersion::V5)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.topic, p.properties.and_then(|pr| pr.topic_alias)),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent, [("a".to_string(), Some(1)), (String::new(), Some(1)), ("b".to_string(), None)]);
    }

    #[test]
    fn empty_topic_without_alias_is_a_protocol_error() {
        let mut s = start(ProtocolVersion::V5, None);
        feed(&mut s, ProtocolVersion::V5, &[Packet::Publish(publish("", QoS::AtMostOnce, 0))]);
        assert_eq!(disconnect_reason(&read(&mut s, ProtocolVersion::V5)), Some(Reason::ProtocolError));
    }

    #[test]
    fn wildcard_publish_topic_closes_with_topic_name_invalid() {
        let mut s = start(ProtocolVersion::V5, None);
        feed(&mut s, ProtocolVersion::V5, &[Packet::Publish(publish("a/+", QoS::AtMostOnce, 0))]);
        assert_eq!(disconnect_reason(&read(&mut s, ProtocolVersion::V5)), Some(Reason::TopicNameInvalid));
        assert!(actions(&mut s).is_empty());
        assert!(s.close_reason().unwrap().publish_will);
    }

    #[test]
    fn invalid_filters_are_refused_one_by_one() {
        let mut s = start(ProtocolVersion::V311, None);
        let mut subscribe = v5::Subscribe::new("ok/+", QoS::AtLeastOnce);
        subscribe.pkid = 4;
        subscribe.filters.push(v5::SubscribeFilter::new("bad+/x".into(), QoS::AtMostOnce));
        feed(&mut s, ProtocolVersion::V311, &[Packet::Subscribe(subscribe)]);
        assert!(matches!(actions(&mut s).as_slice(), [Action::Subscribe { filter, .. }] if filter == "ok/+"));
        match read(&mut s, ProtocolVersion::V311).as_slice() {
            [Packet::SubAck(ack)] => {
                assert_eq!(ack.return_codes, [v5::SubscribeReasonCode::QoS1, v5::SubscribeReasonCode::Unspecified])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keep_alive_is_enforced_at_one_and_a_half_times() {
        let mut s = start(ProtocolVersion::V5, None);
        let deadline = s.deadline().unwrap();
        s.tick(deadline - Duration::from_millis(1));
        assert!(s.close_reason().is_none());
        s.tick(deadline);
        assert_eq!(s.close_reason().unwrap().reason, Reason::KeepAliveTimeout);
    }

    #[test]
    fn normal_disconnect_suppresses_the_will_and_0x04_keeps_it() {
        for (reason, will) in [(Reason::NormalDisconnection, false), (Reason::DisconnectWithWillMessage, true)] {
            let mut s = start(ProtocolVersion::V5, None);
            s.will = Some(Will {
                topic: "w".into(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: None,
                message_expiry: None,
                delay: Duration::ZERO,
            });
            let mut d = v5::Disconnect::new();
            d.reason_code = reason;
            feed(&mut s, ProtocolVersion::V5, &[Packet::Disconnect(d)]);
            assert_eq!(s.finish().1.is_some(), will);
        }
    }

    #[test]
    fn second_connect_is_a_protocol_error() {
        let mut s = start(ProtocolVersion::V5, None);
        feed(&mut s, ProtocolVersion::V5, &[Packet::Connect(v5::Connect::new("again"))]);
        assert_eq!(disconnect_reason(&read(&mut s, ProtocolVersion::V5)), Some(Reason::ProtocolError));
    }

    #[test]
    fn malformed_input_closes_v5_with_0x81() {
        let mut s = start(ProtocolVersion::V5, None);
        let mut input = BytesMut::from(&[0x60u8, 0x02, 0x00, 0x01][..]);
        s.handle_input(&mut input, Instant::now());
        assert_eq!(disconnect_reason(&read(&mut s, ProtocolVersion::V5)), Some(Reason::MalformedPacket));
    }
}
