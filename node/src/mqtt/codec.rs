//! The MQTT codec: framing, decoding and encoding of MQTT 3.1.1 and 5.0 packets over
//! `mqttbytes` 0.6.0, with that crate's known faults fixed here (see `crate-brief.md` §7):
//! short v5 DISCONNECTs, AUTH (type 15), reserved flag checks, truncated bodies reported as
//! malformed instead of "need more bytes", CONNACK always with properties in v5, string length
//! checks on encode, and the whole-packet size limit decided from the fixed header alone.
//!
//! MQTT 3.1.1 packets are lifted into the v5 types, so the session logic has one packet shape.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqttbytes::{v4, v5, QoS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolVersion {
    V311,
    V5,
}

/// MQTT 5 AUTH packet (type 15), which mqttbytes lacks.
#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    pub reason: AuthReason,
    pub method: Option<String>,
    pub data: Option<Bytes>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    Success = 0x00,
    ContinueAuthentication = 0x18,
    ReAuthenticate = 0x19,
}

/// Every packet in one version-neutral shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    Connect(v5::Connect),
    ConnAck(v5::ConnAck),
    Publish(v5::Publish),
    PubAck(v5::PubAck),
    PubRec(v5::PubRec),
    PubRel(v5::PubRel),
    PubComp(v5::PubComp),
    Subscribe(v5::Subscribe),
    SubAck(v5::SubAck),
    Unsubscribe(v5::Unsubscribe),
    UnsubAck(v5::UnsubAck),
    PingReq,
    PingResp,
    Disconnect(v5::Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The whole packet is larger than the limit (MQTT 5 reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// Bytes that do not form a valid packet (MQTT 5 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A well-formed packet that breaks the protocol (MQTT 5 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// CONNECT for a protocol level other than 4 (3.1.1) or 5.
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
}

impl DecodeError {
    pub fn reason_code(&self) -> v5::DisconnectReasonCode {
        match self {
            DecodeError::TooLarge { .. } => v5::DisconnectReasonCode::PacketTooLarge,
            DecodeError::Malformed(_) => v5::DisconnectReasonCode::MalformedPacket,
            DecodeError::Protocol(_) => v5::DisconnectReasonCode::ProtocolError,
            DecodeError::UnsupportedVersion(_) => v5::DisconnectReasonCode::ImplementationSpecificError,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("packet of {size} bytes exceeds the peer's maximum packet size of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("cannot encode packet: {0}")]
    Invalid(String),
}

fn malformed(what: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(what.into())
}

fn protocol(what: impl Into<String>) -> DecodeError {
    DecodeError::Protocol(what.into())
}

/// A complete frame's fixed header.
struct Header {
    byte1: u8,
    header_len: usize,
    remaining: usize,
}

impl Header {
    fn kind(&self) -> u8 {
        self.byte1 >> 4
    }
    fn flags(&self) -> u8 {
        self.byte1 & 0x0F
    }
    fn total(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Reads an MQTT variable byte integer: `Ok(None)` if more bytes are needed.
fn read_varint(bytes: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(malformed("remaining length longer than 4 bytes"));
    }
    Ok(None)
}

/// Parses the fixed header; `Ok(None)` until the whole frame is buffered. The size limit is
/// checked as soon as the header is known.
fn frame(buf: &[u8], max_packet_size: usize) -> Result<Option<Header>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let Some((remaining, len_len)) = read_varint(&buf[1..])? else { return Ok(None) };
    let header = Header { byte1: buf[0], header_len: 1 + len_len, remaining };
    if header.total() > max_packet_size {
        return Err(DecodeError::TooLarge { size: header.total(), max: max_packet_size });
    }
    Ok((buf.len() >= header.total()).then_some(header))
}

/// Rejects reserved flag values (MQTT 2.1.3).
fn check_flags(header: &Header) -> Result<(), DecodeError> {
    let flags = header.flags();
    match header.kind() {
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(malformed("PUBLISH QoS 0 with DUP set"));
            }
            Ok(())
        }
        6 | 8 | 10 if flags != 0b0010 => Err(malformed(format!("packet type {} needs flags 0010, got {flags:04b}", header.kind()))),
        6 | 8 | 10 => Ok(()),
        0 => Err(malformed("reserved packet type 0")),
        kind if flags != 0 => Err(malformed(format!("packet type {kind} with reserved flags {flags:04b}"))),
        _ => Ok(()),
    }
}

fn lib_error(e: mqttbytes::Error) -> DecodeError {
    match e {
        mqttbytes::Error::PacketIdZero => protocol("packet identifier 0"),
        mqttbytes::Error::SubscriptionIdZero => protocol("subscription identifier 0"),
        mqttbytes::Error::InsufficientBytes(_) | mqttbytes::Error::BoundaryCrossed(_) => malformed("packet body is truncated"),
        mqttbytes::Error::TopicNotUtf8 => malformed("string is not valid UTF-8"),
        other => malformed(format!("{other:?}")),
    }
}

/// Decodes the first packet of a connection, which must be CONNECT. `Ok(None)`: more bytes
/// needed, buffer untouched.
pub fn decode_connect(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<(ProtocolVersion, v5::Connect)>, DecodeError> {
    let Some(header) = frame(buf, max_packet_size)? else { return Ok(None) };
    if header.kind() != 1 {
        return Err(protocol("the first packet must be CONNECT"));
    }
    check_flags(&header)?;
    let body = &buf[header.header_len..header.total()];
    let version = connect_version(body)?;
    let mut frame = buf.split_to(header.total());
    let connect = match version {
        ProtocolVersion::V311 => match v4::read(&mut frame, usize::MAX).map_err(lib_error)? {
            v4::Packet::Connect(c) => lift_connect(c),
            _ => return Err(protocol("the first packet must be CONNECT")),
        },
        ProtocolVersion::V5 => match v5::read(&mut frame, usize::MAX).map_err(lib_error)? {
            v5::Packet::Connect(c) => c,
            _ => return Err(protocol("the first packet must be CONNECT")),
        },
    };
    if connect.client_id.contains('\0') || connect.last_will.as_ref().is_some_and(|w| w.topic.contains('\0')) {
        return Err(malformed("CONNECT string contains NUL"));
    }
    Ok(Some((version, connect)))
}

/// Reads protocol name, level and connect flags from a CONNECT body.
fn connect_version(body: &[u8]) -> Result<ProtocolVersion, DecodeError> {
    if body.len() < 2 {
        return Err(malformed("CONNECT too short"));
    }
    let name_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let (name, rest) = body[2..].split_at_checked(name_len).ok_or_else(|| malformed("CONNECT too short"))?;
    let (&level, rest) = rest.split_first().ok_or_else(|| malformed("CONNECT has no protocol level"))?;
    let &flags = rest.first().ok_or_else(|| malformed("CONNECT has no connect flags"))?;
    let version = match (name, level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT" | b"MQIsdp", level) => return Err(DecodeError::UnsupportedVersion(level)),
        _ => return Err(malformed("unknown protocol name in CONNECT")),
    };
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag is set"));
    }
    if version == ProtocolVersion::V311 && flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(malformed("CONNECT has a password but no user name"));
    }
    Ok(version)
}

/// Decodes the next packet after CONNECT. `Ok(None)`: more bytes needed, buffer untouched.
pub fn decode(version: ProtocolVersion, buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = frame(buf, max_packet_size)? else { return Ok(None) };
    check_flags(&header)?;
    let mut frame = buf.split_to(header.total());
    let packet = match (version, header.kind(), header.remaining) {
        (ProtocolVersion::V311, 15, _) => return Err(malformed("AUTH does not exist in MQTT 3.1.1")),
        (ProtocolVersion::V5, 15, _) => Packet::Auth(decode_auth(frame.split_off(header.header_len).freeze())?),
        (ProtocolVersion::V5, 14, 0) => Packet::Disconnect(v5::Disconnect::new()),
        (ProtocolVersion::V5, 14, 1) => {
            let mut disconnect = v5::Disconnect::new();
            disconnect.reason_code = frame[header.header_len].try_into().map_err(lib_error)?;
            Packet::Disconnect(disconnect)
        }
        // mqttbytes' v5 UNSUBSCRIBE decoder prints every packet id to stderr (a stray `dbg!`).
        (ProtocolVersion::V5, 10, _) => Packet::Unsubscribe(decode_unsubscribe_v5(frame.split_off(header.header_len).freeze())?),
        (ProtocolVersion::V5, _, _) => v5::read(&mut frame, usize::MAX).map(lift_v5).map_err(lib_error)?,
        (ProtocolVersion::V311, _, _) => v4::read(&mut frame, usize::MAX).map(lift_v4).map_err(lib_error)?,
    };
    validate(&packet)?;
    Ok(Some(packet))
}

fn lift_v5(packet: v5::Packet) -> Packet {
    match packet {
        v5::Packet::Connect(p) => Packet::Connect(p),
        v5::Packet::ConnAck(p) => Packet::ConnAck(p),
        v5::Packet::Publish(p) => Packet::Publish(p),
        v5::Packet::PubAck(p) => Packet::PubAck(p),
        v5::Packet::PubRec(p) => Packet::PubRec(p),
        v5::Packet::PubRel(p) => Packet::PubRel(p),
        v5::Packet::PubComp(p) => Packet::PubComp(p),
        v5::Packet::Subscribe(p) => Packet::Subscribe(p),
        v5::Packet::SubAck(p) => Packet::SubAck(p),
        v5::Packet::Unsubscribe(p) => Packet::Unsubscribe(p),
        v5::Packet::UnsubAck(p) => Packet::UnsubAck(p),
        v5::Packet::PingReq => Packet::PingReq,
        v5::Packet::PingResp => Packet::PingResp,
        v5::Packet::Disconnect(p) => Packet::Disconnect(p),
    }
}

fn lift_v4(packet: v4::Packet) -> Packet {
    match packet {
        v4::Packet::Connect(c) => Packet::Connect(lift_connect(c)),
        v4::Packet::ConnAck(c) => {
            Packet::ConnAck(v5::ConnAck { session_present: c.session_present, code: lift_connack_code(c.code), properties: None })
        }
        v4::Packet::Publish(p) => Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            properties: None,
            payload: p.payload,
        }),
        v4::Packet::PubAck(p) => Packet::PubAck(v5::PubAck::new(p.pkid)),
        v4::Packet::PubRec(p) => Packet::PubRec(v5::PubRec::new(p.pkid)),
        v4::Packet::PubRel(p) => Packet::PubRel(v5::PubRel::new(p.pkid)),
        v4::Packet::PubComp(p) => Packet::PubComp(v5::PubComp::new(p.pkid)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| v5::SubscribeFilter::new(f.path, f.qos)).collect(),
            properties: None,
        }),
        v4::Packet::SubAck(s) => Packet::SubAck(v5::SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(qos) => granted_code(qos),
                    v4::SubscribeReasonCode::Failure => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(v5::Unsubscribe { pkid: u.pkid, filters: u.topics, properties: None }),
        v4::Packet::UnsubAck(u) => Packet::UnsubAck(v5::UnsubAck { pkid: u.pkid, reasons: Vec::new(), properties: None }),
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::PingResp => Packet::PingResp,
        v4::Packet::Disconnect => Packet::Disconnect(v5::Disconnect::new()),
    }
}

fn lift_connect(c: v4::Connect) -> v5::Connect {
    v5::Connect {
        protocol: mqttbytes::Protocol::V4,
        keep_alive: c.keep_alive,
        client_id: c.client_id,
        clean_session: c.clean_session,
        last_will: c.last_will.map(|w| v5::LastWill { topic: w.topic, message: w.message, qos: w.qos, retain: w.retain, properties: None }),
        login: c.login.map(|l| v5::Login { username: l.username, password: l.password }),
        properties: None,
    }
}

fn lift_connack_code(code: v4::ConnectReturnCode) -> v5::ConnectReturnCode {
    match code {
        v4::ConnectReturnCode::Success => v5::ConnectReturnCode::Success,
        v4::ConnectReturnCode::RefusedProtocolVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
        v4::ConnectReturnCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
        v4::ConnectReturnCode::ServiceUnavailable => v5::ConnectReturnCode::ServerUnavailable,
        v4::ConnectReturnCode::BadUserNamePassword => v5::ConnectReturnCode::BadUserNamePassword,
        v4::ConnectReturnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
    }
}

fn granted_code(qos: QoS) -> v5::SubscribeReasonCode {
    match qos {
        QoS::AtMostOnce => v5::SubscribeReasonCode::QoS0,
        QoS::AtLeastOnce => v5::SubscribeReasonCode::QoS1,
        QoS::ExactlyOnce => v5::SubscribeReasonCode::QoS2,
    }
}

/// Protocol rules mqttbytes does not check.
fn validate(packet: &Packet) -> Result<(), DecodeError> {
    match packet {
        Packet::Publish(p) => {
            if p.qos != QoS::AtMostOnce && p.pkid == 0 {
                return Err(protocol("QoS 1/2 PUBLISH with packet identifier 0"));
            }
            if p.topic.contains('\0') {
                return Err(malformed("PUBLISH topic contains NUL"));
            }
            if let Some(props) = &p.properties {
                if props.topic_alias == Some(0) {
                    return Err(protocol("topic alias 0"));
                }
                if props.subscription_identifiers.contains(&0) {
                    return Err(protocol("subscription identifier 0"));
                }
            }
            Ok(())
        }
        Packet::Subscribe(s) => {
            if s.filters.is_empty() {
                return Err(protocol("SUBSCRIBE without topic filters"));
            }
            if s.pkid == 0 {
                return Err(protocol("SUBSCRIBE with packet identifier 0"));
            }
            if s.filters.iter().any(|f| f.path.contains('\0')) {
                return Err(malformed("topic filter contains NUL"));
            }
            if s.properties.as_ref().is_some_and(|p| p.id == Some(0)) {
                return Err(protocol("subscription identifier 0"));
            }
            Ok(())
        }
        Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(protocol("UNSUBSCRIBE without topic filters"));
            }
            if u.pkid == 0 {
                return Err(protocol("UNSUBSCRIBE with packet identifier 0"));
            }
            if u.filters.iter().any(|f| f.contains('\0')) {
                return Err(malformed("topic filter contains NUL"));
            }
            Ok(())
        }
        Packet::PubAck(v5::PubAck { pkid: 0, .. })
        | Packet::PubRec(v5::PubRec { pkid: 0, .. })
        | Packet::PubRel(v5::PubRel { pkid: 0, .. })
        | Packet::PubComp(v5::PubComp { pkid: 0, .. }) => Err(protocol("acknowledgement with packet identifier 0")),
        Packet::Connect(c) => match &c.properties {
            Some(p) if p.receive_maximum == Some(0) => Err(protocol("Receive Maximum 0")),
            Some(p) if p.max_packet_size == Some(0) => Err(protocol("Maximum Packet Size 0")),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

// Property identifiers of the packets decoded here (AUTH, v5 UNSUBSCRIBE).
const PROP_METHOD: u8 = 0x15;
const PROP_DATA: u8 = 0x16;
const PROP_REASON_STRING: u8 = 0x1F;
const PROP_USER: u8 = 0x26;

fn decode_auth(mut body: Bytes) -> Result<Auth, DecodeError> {
    let mut auth = Auth { reason: AuthReason::Success, method: None, data: None, reason_string: None, user_properties: Vec::new() };
    if body.is_empty() {
        return Ok(auth);
    }
    auth.reason = match body.get_u8() {
        0x00 => AuthReason::Success,
        0x18 => AuthReason::ContinueAuthentication,
        0x19 => AuthReason::ReAuthenticate,
        other => return Err(malformed(format!("AUTH reason code {other:#04x}"))),
    };
    if body.is_empty() {
        return Ok(auth);
    }
    let (len, len_len) = read_varint(&body)?.ok_or_else(|| malformed("AUTH property length truncated"))?;
    body.advance(len_len);
    if body.len() != len {
        return Err(malformed("AUTH property length does not match the packet"));
    }
    while body.has_remaining() {
        match body.get_u8() {
            PROP_METHOD => auth.method = Some(read_string(&mut body)?),
            PROP_DATA => auth.data = Some(read_binary(&mut body)?),
            PROP_REASON_STRING => auth.reason_string = Some(read_string(&mut body)?),
            PROP_USER => {
                let key = read_string(&mut body)?;
                auth.user_properties.push((key, read_string(&mut body)?));
            }
            other => return Err(malformed(format!("AUTH property {other:#04x}"))),
        }
    }
    Ok(auth)
}

fn decode_unsubscribe_v5(mut body: Bytes) -> Result<v5::Unsubscribe, DecodeError> {
    if body.len() < 2 {
        return Err(malformed("UNSUBSCRIBE too short"));
    }
    let pkid = body.get_u16();
    let (len, len_len) = read_varint(&body)?.ok_or_else(|| malformed("UNSUBSCRIBE property length truncated"))?;
    body.advance(len_len);
    if body.len() < len {
        return Err(malformed("UNSUBSCRIBE properties truncated"));
    }
    let mut props = body.split_to(len);
    let mut user_properties = Vec::new();
    while props.has_remaining() {
        match props.get_u8() {
            PROP_USER => {
                let key = read_string(&mut props)?;
                user_properties.push((key, read_string(&mut props)?));
            }
            other => return Err(malformed(format!("UNSUBSCRIBE property {other:#04x}"))),
        }
    }
    let mut filters = Vec::new();
    while body.has_remaining() {
        filters.push(read_string(&mut body)?);
    }
    let properties = (!user_properties.is_empty()).then_some(v5::UnsubscribeProperties { user_properties });
    Ok(v5::Unsubscribe { pkid, filters, properties })
}

fn read_binary(body: &mut Bytes) -> Result<Bytes, DecodeError> {
    if body.len() < 2 {
        return Err(malformed("string length truncated"));
    }
    let len = usize::from(body.get_u16());
    if body.len() < len {
        return Err(malformed("string truncated"));
    }
    Ok(body.split_to(len))
}

fn read_string(body: &mut Bytes) -> Result<String, DecodeError> {
    let raw = read_binary(body)?;
    let s = String::from_utf8(raw.to_vec()).map_err(|_| malformed("string is not valid UTF-8"))?;
    if s.contains('\0') {
        return Err(malformed("string contains NUL"));
    }
    Ok(s)
}

/// Appends the encoding of `packet` for `version` to `out`; returns the bytes written. On any
/// error `out` is left as it was. For 3.1.1, v5-only fields are dropped and reason codes mapped
/// (a DISCONNECT loses its reason); AUTH has no 3.1.1 form and is an error.
pub fn encode(version: ProtocolVersion, packet: &Packet, out: &mut BytesMut, max_packet_size: Option<usize>) -> Result<usize, EncodeError> {
    let start = out.len();
    let result = check_strings(packet).and_then(|()| match version {
        ProtocolVersion::V5 => encode_v5(packet, out),
        ProtocolVersion::V311 => encode_v4(packet, out),
    });
    let written = match result {
        Ok(()) => out.len() - start,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    if let Some(max) = max_packet_size.filter(|&max| written > max) {
        out.truncate(start);
        return Err(EncodeError::TooLarge { size: written, max });
    }
    Ok(written)
}

/// mqttbytes truncates strings over 65535 bytes silently; refuse them instead.
fn check_strings(packet: &Packet) -> Result<(), EncodeError> {
    let too_long = |s: &str| s.len() > usize::from(u16::MAX);
    let bad = match packet {
        Packet::Publish(p) => {
            too_long(&p.topic)
                || p.properties.as_ref().is_some_and(|props| {
                    props.response_topic.as_deref().is_some_and(too_long)
                        || props.content_type.as_deref().is_some_and(too_long)
                        || props.user_properties.iter().any(|(k, v)| too_long(k) || too_long(v))
                })
        }
        Packet::Connect(c) => too_long(&c.client_id) || c.last_will.as_ref().is_some_and(|w| too_long(&w.topic)),
        Packet::Subscribe(s) => s.filters.iter().any(|f| too_long(&f.path)),
        Packet::Unsubscribe(u) => u.filters.iter().any(|f| too_long(f)),
        _ => false,
    };
    if bad {
        return Err(EncodeError::Invalid("a string is longer than 65535 bytes".into()));
    }
    Ok(())
}

/// The fixed-header fields of a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishHeader {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Packet identifier; ignored at QoS 0.
    pub pkid: u16,
}

/// Encodes a PUBLISH from borrowed parts, without building an owned packet: the fan-out path
/// that runs once per subscriber. Same contract as [`encode`].
pub fn encode_publish(
    version: ProtocolVersion,
    header: PublishHeader,
    topic: &str,
    properties: Option<&v5::PublishProperties>,
    payload: &Bytes,
    out: &mut BytesMut,
    max_packet_size: Option<usize>,
) -> Result<usize, EncodeError> {
    if let (ProtocolVersion::V5, Some(props)) = (version, properties) {
        let publish = v5::Publish {
            dup: header.dup,
            qos: header.qos,
            retain: header.retain,
            topic: topic.to_string(),
            pkid: header.pkid,
            properties: Some(props.clone()),
            payload: payload.clone(),
        };
        return encode(version, &Packet::Publish(publish), out, max_packet_size);
    }
    let topic_len = u16::try_from(topic.len()).map_err(|_| EncodeError::Invalid("topic longer than 65535 bytes".into()))?;
    if header.qos != QoS::AtMostOnce && header.pkid == 0 {
        return Err(EncodeError::Invalid("QoS 1/2 PUBLISH needs a packet identifier".into()));
    }
    let pkid_len = if header.qos == QoS::AtMostOnce { 0 } else { 2 };
    let properties_len = usize::from(version == ProtocolVersion::V5);
    let remaining = 2 + topic.len() + pkid_len + properties_len + payload.len();
    let total = 1 + varint_len(remaining) + remaining;
    if let Some(max) = max_packet_size.filter(|&max| total > max) {
        return Err(EncodeError::TooLarge { size: total, max });
    }
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::Invalid(format!("packet of {total} bytes is over the MQTT limit")));
    }
    out.reserve(total);
    out.put_u8(0x30 | u8::from(header.retain) | (header.qos as u8) << 1 | u8::from(header.dup) << 3);
    put_varint(out, remaining);
    out.put_u16(topic_len);
    out.put_slice(topic.as_bytes());
    if pkid_len > 0 {
        out.put_u16(header.pkid);
    }
    if properties_len > 0 {
        out.put_u8(0);
    }
    out.put_slice(payload);
    Ok(total)
}

/// Largest remaining length a fixed header can express.
const MAX_REMAINING_LENGTH: usize = 268_435_455;

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn encoded(result: Result<usize, mqttbytes::Error>) -> Result<(), EncodeError> {
    result.map(|_| ()).map_err(|e| EncodeError::Invalid(format!("{e:?}")))
}

fn encode_v5(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(p) => encoded(p.write(out)),
        Packet::ConnAck(p) if p.properties.is_none() => {
            let with_properties = v5::ConnAck { properties: Some(v5::ConnAckProperties::new()), ..p.clone() };
            encoded(with_properties.write(out))
        }
        Packet::ConnAck(p) => encoded(p.write(out)),
        Packet::Publish(p) => encoded(p.write(out)),
        Packet::PubAck(p) => encoded(p.write(out)),
        Packet::PubRec(p) => encoded(p.write(out)),
        Packet::PubRel(p) => encoded(p.write(out)),
        Packet::PubComp(p) => encoded(p.write(out)),
        Packet::Subscribe(p) => encoded(p.write(out)),
        Packet::SubAck(p) => encoded(p.write(out)),
        Packet::Unsubscribe(p) => encoded(p.write(out)),
        Packet::UnsubAck(p) => encoded(p.write(out)),
        Packet::PingReq => encoded(v5::PingReq.write(out)),
        Packet::PingResp => encoded(v5::PingResp.write(out)),
        Packet::Disconnect(p) => encoded(p.write(out)),
        Packet::Auth(a) => encode_auth(a, out),
    }
}

fn encode_v4(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => encoded(
            v4::Connect {
                protocol: mqttbytes::Protocol::V4,
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_session: c.clean_session,
                last_will: c.last_will.as_ref().map(|w| v4::LastWill {
                    topic: w.topic.clone(),
                    message: w.message.clone(),
                    qos: w.qos,
                    retain: w.retain,
                }),
                login: c.login.as_ref().map(|l| v4::Login { username: l.username.clone(), password: l.password.clone() }),
            }
            .write(out),
        ),
        Packet::ConnAck(c) => encoded(v4::ConnAck::new(v4_connack_code(c.code), c.session_present).write(out)),
        Packet::Publish(p) => encoded(
            v4::Publish { dup: p.dup, qos: p.qos, retain: p.retain, topic: p.topic.clone(), pkid: p.pkid, payload: p.payload.clone() }
                .write(out),
        ),
        Packet::PubAck(p) => encoded(v4::PubAck::new(p.pkid).write(out)),
        Packet::PubRec(p) => encoded(v4::PubRec::new(p.pkid).write(out)),
        Packet::PubRel(p) => encoded(v4::PubRel::new(p.pkid).write(out)),
        Packet::PubComp(p) => encoded(v4::PubComp::new(p.pkid).write(out)),
        Packet::Subscribe(s) => {
            let mut v4s = v4::Subscribe::empty_subscribe();
            v4s.pkid = s.pkid;
            for f in &s.filters {
                v4s.add(f.path.clone(), f.qos);
            }
            encoded(v4s.write(out))
        }
        Packet::SubAck(s) => {
            let codes = s
                .return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::QoS0 => v4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                    v5::SubscribeReasonCode::QoS1 => v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    v5::SubscribeReasonCode::QoS2 => v4::SubscribeReasonCode::Success(QoS::ExactlyOnce),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            encoded(v4::SubAck::new(s.pkid, codes).write(out))
        }
        Packet::Unsubscribe(u) => encoded(v4::Unsubscribe { pkid: u.pkid, topics: u.filters.clone() }.write(out)),
        Packet::UnsubAck(u) => encoded(v4::UnsubAck::new(u.pkid).write(out)),
        Packet::PingReq => encoded(v4::PingReq.write(out)),
        Packet::PingResp => encoded(v4::PingResp.write(out)),
        Packet::Disconnect(_) => encoded(v4::Disconnect.write(out)),
        Packet::Auth(_) => Err(EncodeError::Invalid("AUTH does not exist in MQTT 3.1.1".into())),
    }
}

fn v4_connack_code(code: v5::ConnectReturnCode) -> v4::ConnectReturnCode {
    match code {
        v5::ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
        v5::ConnectReturnCode::UnsupportedProtocolVersion => v4::ConnectReturnCode::RefusedProtocolVersion,
        v5::ConnectReturnCode::ClientIdentifierNotValid => v4::ConnectReturnCode::BadClientId,
        v5::ConnectReturnCode::BadUserNamePassword => v4::ConnectReturnCode::BadUserNamePassword,
        v5::ConnectReturnCode::NotAuthorized | v5::ConnectReturnCode::BadAuthenticationMethod | v5::ConnectReturnCode::Banned => {
            v4::ConnectReturnCode::NotAuthorized
        }
        _ => v4::ConnectReturnCode::ServiceUnavailable,
    }
}

fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

fn put_binary(out: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::Invalid("AUTH field longer than 65535 bytes".into()))?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}

fn encode_auth(auth: &Auth, out: &mut BytesMut) -> Result<(), EncodeError> {
    let mut props = BytesMut::new();
    if let Some(method) = &auth.method {
        props.put_u8(PROP_METHOD);
        put_binary(&mut props, method.as_bytes())?;
    }
    if let Some(data) = &auth.data {
        props.put_u8(PROP_DATA);
        put_binary(&mut props, data)?;
    }
    if let Some(reason) = &auth.reason_string {
        props.put_u8(PROP_REASON_STRING);
        put_binary(&mut props, reason.as_bytes())?;
    }
    for (key, value) in &auth.user_properties {
        props.put_u8(PROP_USER);
        put_binary(&mut props, key.as_bytes())?;
        put_binary(&mut props, value.as_bytes())?;
    }
    out.put_u8(0xF0);
    if auth.reason == AuthReason::Success && props.is_empty() {
        out.put_u8(0);
        return Ok(());
    }
    let mut props_len = BytesMut::new();
    put_varint(&mut props_len, props.len());
    put_varint(out, 1 + props_len.len() + props.len());
    out.put_u8(auth.reason as u8);
    out.put_slice(&props_len);
    out.put_slice(&props);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProtocolVersion::{V311, V5};

    fn decode_bytes(version: ProtocolVersion, bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(version, &mut BytesMut::from(bytes), 1024)
    }

    fn encode_bytes(version: ProtocolVersion, packet: &Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(version, packet, &mut out, None).unwrap();
        out.to_vec()
    }

    #[test]
    fn short_v5_disconnects_decode() {
        let normal = decode_bytes(V5, &[0xE0, 0x00]).unwrap().unwrap();
        assert_eq!(normal, Packet::Disconnect(v5::Disconnect::new()));
        match decode_bytes(V5, &[0xE0, 0x01, 0x8E]).unwrap().unwrap() {
            Packet::Disconnect(d) => assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver),
            other => panic!("{other:?}"),
        }
        assert_eq!(decode_bytes(V311, &[0xE0, 0x00]).unwrap().unwrap(), Packet::Disconnect(v5::Disconnect::new()));
    }

    #[test]
    fn reserved_flags_are_malformed() {
        for version in [V311, V5] {
            assert!(matches!(decode_bytes(version, &[0x60, 0x02, 0x00, 0x01]), Err(DecodeError::Malformed(_))));
            assert!(matches!(decode_bytes(version, &[0xC1, 0x00]), Err(DecodeError::Malformed(_))));
            assert!(matches!(decode_bytes(version, &[0x36, 0x03, 0x00, 0x01, b'a']), Err(DecodeError::Malformed(_))));
            assert!(matches!(decode_bytes(version, &[0x38, 0x03, 0x00, 0x01, b'a']), Err(DecodeError::Malformed(_))));
        }
    }

    #[test]
    fn auth_exists_only_in_v5() {
        let auth = decode_bytes(V5, &[0xF0, 0x00]).unwrap().unwrap();
        assert!(matches!(auth, Packet::Auth(Auth { reason: AuthReason::Success, method: None, .. })));
        assert!(matches!(decode_bytes(V311, &[0xF0, 0x00]), Err(DecodeError::Malformed(_))));
        let full = Auth {
            reason: AuthReason::ContinueAuthentication,
            method: Some("SCRAM-SHA-256".into()),
            data: Some(Bytes::from_static(b"n,,n=user")),
            reason_string: Some("go on".into()),
            user_properties: vec![("k".into(), "v".into())],
        };
        let bytes = encode_bytes(V5, &Packet::Auth(full.clone()));
        assert_eq!(decode_bytes(V5, &bytes).unwrap().unwrap(), Packet::Auth(full));
        let success = Auth { reason: AuthReason::Success, method: None, data: None, reason_string: None, user_properties: vec![] };
        assert!(encode(V311, &Packet::Auth(success), &mut BytesMut::new(), None).is_err());
    }

    #[test]
    fn size_limit_is_decided_from_the_header() {
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x03][..]);
        assert_eq!(decode(V5, &mut buf, 1000), Err(DecodeError::TooLarge { size: 65_539, max: 1000 }));
        assert!(matches!(decode_bytes(V5, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), Err(DecodeError::Malformed(_))));
        assert_eq!(decode_bytes(V5, &[0x30, 0xFF]), Ok(None));
        assert_eq!(decode_bytes(V5, &[0x30]), Ok(None));
    }

    #[test]
    fn truncated_body_is_malformed_not_incomplete() {
        // Remaining length 3, but the topic length claims 10 bytes.
        assert!(matches!(decode_bytes(V311, &[0x30, 0x03, 0x00, 0x0A, b'a']), Err(DecodeError::Malformed(_))));
        // A v5 DISCONNECT with a reason and a property length pointing past the end.
        assert!(matches!(decode_bytes(V5, &[0xE0, 0x02, 0x00, 0x05]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn nul_and_invalid_utf8_in_topics_are_malformed() {
        let topic = b"a/+/\0x";
        let mut bytes = vec![0x30, 2 + topic.len() as u8, 0x00, topic.len() as u8];
        bytes.extend_from_slice(topic);
        assert!(matches!(decode_bytes(V311, &bytes), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode_bytes(V311, &[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn packet_id_zero_is_a_protocol_error() {
        assert!(matches!(decode_bytes(V311, &[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]), Err(DecodeError::Protocol(_))));
        assert!(matches!(decode_bytes(V311, &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00]), Err(DecodeError::Protocol(_))));
    }

    #[test]
    fn connect_versions() {
        let mut mqisdp = BytesMut::from(&[0x10, 0x0C, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C][..]);
        assert_eq!(decode_connect(&mut mqisdp, 1024), Err(DecodeError::UnsupportedVersion(3)));
        for version in [V311, V5] {
            let mut connect = v5::Connect::new("dev-1");
            connect.keep_alive = 30;
            let mut buf = BytesMut::from(&encode_bytes(version, &Packet::Connect(connect))[..]);
            let (found, decoded) = decode_connect(&mut buf, 1024).unwrap().unwrap();
            assert_eq!(found, version);
            assert_eq!((decoded.client_id.as_str(), decoded.keep_alive), ("dev-1", 30));
            assert!(buf.is_empty());
        }
        let mut not_connect = BytesMut::from(&[0xC0u8, 0x00][..]);
        assert!(matches!(decode_connect(&mut not_connect, 1024), Err(DecodeError::Protocol(_))));
        let mut reserved = BytesMut::from(&[0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x03, 0x00, 0x3C, 0x00, 0x00][..]);
        assert!(matches!(decode_connect(&mut reserved, 1024), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn v5_connack_always_has_properties_and_v3_codes_are_mapped() {
        let ack = v5::ConnAck { session_present: false, code: v5::ConnectReturnCode::Success, properties: None };
        assert_eq!(encode_bytes(V5, &Packet::ConnAck(ack)), [0x20, 0x03, 0x00, 0x00, 0x00]);
        let refused = v5::ConnAck { session_present: false, code: v5::ConnectReturnCode::NotAuthorized, properties: None };
        assert_eq!(encode_bytes(V311, &Packet::ConnAck(refused)), [0x20, 0x02, 0x00, 0x05]);
        let busy = v5::ConnAck { session_present: false, code: v5::ConnectReturnCode::ServerBusy, properties: None };
        assert_eq!(encode_bytes(V311, &Packet::ConnAck(busy)), [0x20, 0x02, 0x00, 0x03]);
    }

    #[test]
    fn over_long_strings_and_sizes_are_refused_without_output() {
        let publish = Packet::Publish(v5::Publish::new("x".repeat(70_000), QoS::AtMostOnce, "p"));
        let mut out = BytesMut::from(&b"keep"[..]);
        assert!(matches!(encode(V5, &publish, &mut out, None), Err(EncodeError::Invalid(_))));
        assert_eq!(&out[..], b"keep");
        let small = Packet::Publish(v5::Publish::new("t", QoS::AtMostOnce, vec![0u8; 100]));
        assert!(matches!(encode(V311, &small, &mut out, Some(50)), Err(EncodeError::TooLarge { .. })));
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn borrowed_publish_matches_mqttbytes() {
        let payload = Bytes::from_static(b"payload");
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let mut ours = BytesMut::new();
            let header = PublishHeader { dup: false, qos, retain: true, pkid: 9 };
            encode_publish(V5, header, "a/b", None, &payload, &mut ours, None).unwrap();
            let mut theirs = BytesMut::new();
            let mut p = v5::Publish::from_bytes("a/b", qos, payload.clone());
            p.retain = true;
            p.pkid = 9;
            p.write(&mut theirs).unwrap();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn packets_round_trip_in_both_versions() {
        let mut subscribe = v5::Subscribe::new("a/+", QoS::ExactlyOnce);
        subscribe.pkid = 3;
        let mut publish = v5::Publish::new("t/1", QoS::AtLeastOnce, "data");
        publish.pkid = 11;
        let packets = [
            Packet::Publish(publish),
            Packet::PubAck(v5::PubAck::new(11)),
            Packet::PubRec(v5::PubRec::new(12)),
            Packet::PubRel(v5::PubRel::new(12)),
            Packet::PubComp(v5::PubComp::new(12)),
            Packet::Subscribe(subscribe),
            Packet::Unsubscribe(v5::Unsubscribe { pkid: 4, filters: vec!["a/+".into()], properties: None }),
            Packet::PingReq,
            Packet::PingResp,
        ];
        for version in [V311, V5] {
            for packet in &packets {
                let bytes = encode_bytes(version, packet);
                assert_eq!(decode_bytes(version, &bytes).unwrap().as_ref(), Some(packet), "{version:?}");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = bytes.first_mut() {
                *first = (*first & 0x0F) | (((next() % 16) as u8) << 4);
            }
            let _ = decode_connect(&mut BytesMut::from(&bytes[..]), 64);
            for version in [V311, V5] {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(packet)) = decode(version, &mut buf, 64) {
                    let mut out = BytesMut::new();
                    let _ = encode(version, &packet, &mut out, None);
                }
            }
        }
    }
}
