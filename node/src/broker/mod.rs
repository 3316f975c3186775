//! The broker core: subscription index, retained store, client registry and the routing of
//! messages between sessions. Knows nothing of bytes or sockets.

pub mod index;
pub mod mailbox;
pub mod message;
pub mod persist;
pub mod registry;
pub mod retained;
pub mod topic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use index::{Subscriber, SubscriptionIndex, SubscriptionOptions};
use mailbox::Pushed;
use message::{min_qos, Delivery, Message, SessionId};
use persist::{SessionStore, StoredSession};
use registry::{Registry, SessionRecord};
use retained::RetainedStore;

use crate::telemetry::metrics::Gauges;

/// Broker-wide behaviour settings (from the `[limits]` config section).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Messages a session queues before the overflow policy applies (DEVICE clients and
    /// clients without a credential).
    pub max_queued_messages: usize,
    /// The same for APPLICATION clients.
    pub application_max_queued_messages: usize,
    /// How long a publisher waits for room in a full online subscriber queue.
    pub slow_subscriber_timeout: Duration,
    /// How long a new connection waits for the previous connection of its client id to hand over.
    pub takeover_timeout: Duration,
    /// How many retained messages, and how many bytes of them, this node keeps.
    pub retained: retained::RetainedLimits,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            max_queued_messages: 1000,
            application_max_queued_messages: 100_000,
            slow_subscriber_timeout: Duration::from_secs(5),
            takeover_timeout: Duration::from_secs(10),
            retained: retained::RetainedLimits::default(),
        }
    }
}

pub struct Broker {
    pub index: SubscriptionIndex,
    pub retained: RetainedStore,
    pub registry: Registry,
    pub settings: BrokerSettings,
    /// Where durable (APPLICATION) sessions are kept; `None`: all sessions in memory only.
    sessions: Option<SessionStore>,
}

impl Broker {
    pub fn new(settings: BrokerSettings, sessions: Option<SessionStore>) -> Arc<Broker> {
        let broker = Arc::new(Broker {
            index: SubscriptionIndex::new(),
            retained: RetainedStore::new(settings.retained),
            registry: Registry::new(settings.max_queued_messages),
            settings,
            sessions,
        });
        broker.restore_sessions();
        broker
    }

    /// Puts the stored durable sessions back, with their subscriptions and messages.
    fn restore_sessions(&self) {
        let Some(store) = &self.sessions else { return };
        let stored = store.load();
        let count = stored.len();
        for (client_id, session) in stored {
            self.registry.restore(&client_id, |mut record| {
                record.durable = true;
                record.started = true;
                record.expiry = session.expiry();
                record.expires_at = Some(session.expires_at());
                record.mailbox.set_capacity(self.settings.application_max_queued_messages);
                for (filter, options) in session.subscriptions() {
                    self.subscribe(&mut record, filter, options);
                }
                for delivery in session.into_deliveries() {
                    let _ = record.mailbox.try_push(delivery);
                }
                record
            });
        }
        if count > 0 {
            tracing::info!(sessions = count, "restored durable sessions");
        }
    }

    /// Stores a durable session that just went offline.
    pub fn session_offline(&self, client_id: &str, session: &StoredSession) {
        if let Some(store) = &self.sessions {
            if let Err(e) = store.save(client_id, session) {
                tracing::error!(%client_id, error = %format!("{e:#}"), "durable session not stored");
            }
        }
    }

    /// Stores every offline durable session and flushes the store (at shutdown).
    pub fn persist_sessions(&self) {
        let Some(store) = &self.sessions else { return };
        self.registry.for_each_offline(|client_id, record| {
            if record.durable {
                self.session_offline(client_id, &StoredSession::capture(record));
            }
        });
        if let Err(e) = store.flush() {
            tracing::error!(error = %format!("{e:#}"), "session store not flushed");
        }
    }

    /// Stores a retained message and hands the message to every matching session. Waits while
    /// an online subscriber's queue is full (flow control towards the publisher). Returns the
    /// number of sessions it was queued for.
    pub async fn publish(&self, message: Arc<Message>) -> usize {
        if message.retain {
            self.retained.set(message.clone());
        }
        let mut waiting: Vec<(Arc<mailbox::Mailbox>, Delivery)> = Vec::new();
        let mut queued = 0;
        let publisher = message.publisher;
        self.index.route(&message.topic, publisher, |route| {
            let delivery = Delivery {
                message: message.clone(),
                qos: min_qos(message.qos, route.qos),
                retain: message.retain && route.retain_as_published,
                subscription_ids: route.subscription_ids,
            };
            match route.mailbox.try_push(delivery) {
                Ok(pushed) => queued += usize::from(is_queued(pushed)),
                // The publisher's own queue: it cannot drain while it waits, so never wait on it.
                Err(delivery) if Some(route.session) == publisher => {
                    queued += usize::from(is_queued(route.mailbox.push_congested(delivery)));
                }
                Err(delivery) => waiting.push((route.mailbox, delivery)),
            }
        });
        for (mailbox, delivery) in waiting {
            queued += usize::from(is_queued(mailbox.push_wait(delivery, self.settings.slow_subscriber_timeout).await));
        }
        queued
    }

    /// Adds or replaces a subscription of `record`'s session. Returns whether it is new.
    pub fn subscribe(&self, record: &mut SessionRecord, filter: &str, options: SubscriptionOptions) -> bool {
        let Ok(parsed) = topic::parse_filter(filter, topic::TopicLimits::UNLIMITED) else {
            return false;
        };
        let subscriber = Subscriber { session: record.id, mailbox: record.mailbox.clone(), options: options.clone() };
        self.index.subscribe(parsed.filter, parsed.share_group, subscriber);
        record.subscriptions.insert(filter.to_string(), options).is_none()
    }

    /// Retained messages for a new subscription, as deliveries at the granted QoS.
    pub fn retained_for(&self, filter: &str, options: &SubscriptionOptions) -> Vec<Delivery> {
        self.retained
            .matching(filter)
            .into_iter()
            .map(|message| Delivery {
                qos: min_qos(message.qos, options.qos),
                retain: true,
                subscription_ids: options.subscription_id.into_iter().collect(),
                message,
            })
            .collect()
    }

    /// Removes a subscription of `record`'s session. Returns whether it existed.
    pub fn unsubscribe(&self, record: &mut SessionRecord, filter: &str) -> bool {
        if record.subscriptions.remove(filter).is_none() {
            return false;
        }
        remove_from_index(&self.index, record.id, filter);
        true
    }

    /// Drops every subscription of a session that has ended, and its stored copy.
    pub fn end_session(&self, client_id: &str, record: SessionRecord) {
        for filter in record.subscriptions.keys() {
            remove_from_index(&self.index, record.id, filter);
        }
        if let (true, Some(store)) = (record.durable, &self.sessions) {
            if let Err(e) = store.remove(client_id) {
                tracing::error!(%client_id, error = %format!("{e:#}"), "ended durable session not removed from the store");
            }
        }
    }

    /// Ends offline sessions whose expiry has passed.
    pub fn expire_sessions(&self, now: Instant) {
        for (client_id, record) in self.registry.expire(now) {
            self.end_session(&client_id, record);
        }
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            sessions: self.registry.len(),
            subscriptions: self.index.len(),
            retained: self.retained.len(),
            retained_bytes: self.retained.bytes(),
        }
    }
}

fn remove_from_index(index: &SubscriptionIndex, session: SessionId, filter: &str) {
    let parsed = topic::parse_filter(filter, topic::TopicLimits::UNLIMITED);
    if let Ok(parsed) = parsed {
        index.unsubscribe(parsed.filter, parsed.share_group, session);
    }
}

fn is_queued(pushed: Pushed) -> bool {
    matches!(pushed, Pushed::Queued | Pushed::QueuedDroppedOldest)
}
