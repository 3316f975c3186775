//! Redispatch within shared groups: a message given to one member of a `$share/<group>/<filter>`
//! goes to another member when that member refuses it (MQTT 5 PUBACK / PUBREC reason code 0x80
//! or more), does not acknowledge it within `limits.shared_ack_timeout_ms`, or leaves while
//! holding it (its connection ends, or its offline session expires, with the message queued or
//! in flight). Members on this node that already had the message are not chosen again; when none
//! is left here, the message is passed on once to another node with members of the group; past
//! that it is dropped and counted (`shared_group_exhausted`). Delivery to a group is therefore at
//! least once: a member that processed a message but whose acknowledgement was lost or late
//! is not the only one to get it.

use super::message::{min_qos, Delivery, SessionId};
use super::state::{Inflight, SessionState};
use super::Broker;
use crate::telemetry::metrics::{self, DropReason, RedispatchReason};
use crate::topic::{self, ParsedFilter, TopicLimits};

impl Broker {
    /// Gives a shared-group delivery that session `from` did not take to another member of its
    /// group. Deliveries that are not for a shared group are ignored.
    pub fn redispatch(&self, mut delivery: Delivery, from: SessionId, reason: RedispatchReason) {
        let Some(shared) = delivery.shared.as_mut() else { return };
        metrics::shared_redispatched(reason);
        shared.tried.push(from);
        let member = match topic::parse_filter(&shared.route, TopicLimits::UNLIMITED) {
            Ok(ParsedFilter { share_group: Some(group), filter }) => self.inner.index.shared_member(filter, group, &shared.tried),
            _ => None,
        };
        if let Some(member) = member {
            delivery.qos = min_qos(delivery.message.qos, member.qos);
            delivery.retain = delivery.message.retain && member.retain_as_published;
            delivery.subscription_ids = member.subscription_ids;
            if let Err(delivery) = member.mailbox.try_push(delivery) {
                let deadline = tokio::time::Instant::now() + self.inner.settings.slow_subscriber_timeout;
                tokio::spawn(async move { member.mailbox.push_wait(delivery, deadline).await });
            }
            return;
        }
        let passed_on = match (self.inner.remote.get(), shared.passed_on) {
            (Some(remote), false) => remote.redispatch(&delivery.message, &shared.route),
            _ => false,
        };
        if !passed_on {
            tracing::debug!(route = %shared.route, topic = %delivery.message.topic, "no member of the shared group left to take the message");
            metrics::dropped(DropReason::SharedGroupExhausted);
        }
    }

    /// Gives the shared-group messages a session holds — queued, or sent and not yet
    /// acknowledged — to other members, because the session's client left.
    pub(super) fn redispatch_held(&self, session: &mut SessionState) {
        let mut in_flight: Vec<(u64, u16)> = (session.inflight.iter())
            .filter(|(_, (_, f))| matches!(f, Inflight::Publish(d) if d.shared.is_some()))
            .map(|(&pkid, (sequence, _))| (*sequence, pkid))
            .collect();
        in_flight.sort_unstable();
        let mut held: Vec<Delivery> = (in_flight.into_iter())
            .filter_map(|(_, pkid)| match session.inflight.remove(&pkid) {
                Some((_, Inflight::Publish(delivery))) => Some(delivery),
                _ => None,
            })
            .collect();
        held.extend(session.mailbox.take_shared());
        for delivery in held {
            self.redispatch(delivery, session.id, RedispatchReason::MemberLeft);
        }
    }
}
