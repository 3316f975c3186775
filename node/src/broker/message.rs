//! The application message as it travels through the broker, and its per-subscriber delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttbytes::v5::{self, PublishProperties};
use mqttbytes::QoS;

use crate::auth::policy::Owner;

/// Identifies one session (not one connection) inside this node.
pub type SessionId = u64;

/// A message's identity across the cluster: the node it was published on and a number unique
/// there (random start per process). The same message reaching a session twice during a session
/// move (directly and in the old node's tail) is recognised by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MessageId {
    pub node: u64,
    pub number: u64,
}

/// A published message, allocated once and shared by every subscriber that receives it.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// The RETAIN flag as the publisher set it.
    pub retain: bool,
    /// MQTT 5 properties passed through to subscribers (payload format, content type, response
    /// topic, correlation data, user properties). Topic alias, subscription identifiers and the
    /// expiry interval are per delivery and never stored here.
    pub properties: Option<PublishProperties>,
    /// When the message expires (MQTT 5 Message Expiry Interval).
    pub expires_at: Option<Instant>,
    /// The publishing session, for the MQTT 5 No Local option; `None` for messages the broker
    /// itself originates.
    pub publisher: Option<SessionId>,
    /// Its identity in a cluster (given when it is published on a clustered node).
    pub id: Option<MessageId>,
}

impl Message {
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// Delivery QoS: the lower of the message QoS and the granted subscription QoS.
    pub qos: QoS,
    /// RETAIN flag as sent to this subscriber.
    pub retain: bool,
    /// Subscription identifiers of every matching subscription (MQTT 5).
    pub subscription_ids: Vec<usize>,
    /// Set when the session received it as one member of a shared group: the message goes to
    /// another member if this one refuses it, does not acknowledge it in time, or leaves.
    pub shared: Option<Box<SharedDelivery>>,
}

/// A delivery to one member of a shared group, and where it has been.
#[derive(Debug, Clone)]
pub struct SharedDelivery {
    /// The group's route, `$share/<group>/<filter>`.
    pub route: Arc<str>,
    /// The members on this node that already had the message (and refused or lost it).
    pub tried: Vec<SessionId>,
    /// Whether the message already came from another node by redispatch (it is not passed on
    /// between nodes a second time).
    pub passed_on: bool,
}

/// The lower of two QoS levels.
pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

/// The higher of two QoS levels.
pub fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}

/// Decides, when a will fires, whether its client may still publish it: its certificate may
/// have been revoked, or its permission removed, during the will delay. `Ok`: the principal it
/// is published as (whose retained quota it counts against); `Err` says why not.
pub type WillCheck = Box<dyn FnOnce(&Will) -> Result<Owner, String> + Send>;

/// A last-will message and when to send it after an abnormal disconnect.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<v5::PublishProperties>,
    pub message_expiry: Option<Duration>,
    pub delay: Duration,
}

impl Will {
    /// The will as a message published now.
    pub fn into_message(self, now: Instant) -> Message {
        Message {
            topic: self.topic,
            payload: self.payload,
            qos: self.qos,
            retain: self.retain,
            properties: self.properties,
            expires_at: self.message_expiry.map(|e| now + e),
            publisher: None,
            id: None,
        }
    }
}
