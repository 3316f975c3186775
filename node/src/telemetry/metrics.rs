//! Process-wide counters and gauges, rendered in the Prometheus text format.
//!
//! Plain atomics: the hot path pays one relaxed increment per event and takes no lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use mqttbytes::QoS;

/// Why a message was not delivered to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// QoS 0 message for an online subscriber whose queue was full.
    SlowSubscriberQos0,
    /// QoS 1/2 message for an online subscriber whose queue stayed full past the timeout; the oldest queued message was dropped.
    SlowSubscriberTimeout,
    /// QoS 0 message for an offline session (not queued).
    OfflineQos0,
    /// Offline session queue full; the oldest queued message was dropped.
    QueueFull,
    /// Message expired before it could be sent.
    Expired,
    /// Larger than the subscriber's Maximum Packet Size.
    TooLargeForClient,
    /// PUBLISH refused by the broker (e.g. invalid payload format).
    Refused,
    /// PUBLISH to a topic the client may not write.
    NotAuthorized,
    /// Message on a topic the subscriber may not read (withheld at delivery).
    ReadNotAuthorized,
    /// Retained message past the session's `max_retained_replay_bytes` after a SUBSCRIBE.
    RetainedReplayLimit,
    /// Forwarded for a shared group that had no member left on any node.
    SharedGroupGone,
    /// A shared-group message that every member it could still reach refused, left unacknowledged
    /// or left with.
    SharedGroupExhausted,
    /// Queued for a session that moved to another node which never collected it (the move was
    /// not completed in time).
    MoveAbandoned,
    /// Reached a session a second time: directly and with a moving session's tail, or re-sent
    /// by a link into a stored queue that already held it (after this node restarted).
    MoveDuplicate,
    /// Would not fit in one frame of a forwarding link (not forwarded to that peer).
    TooLargeForLink,
}

impl DropReason {
    /// Every reason, in declaration order (so `reason as usize` indexes it).
    const ALL: [DropReason; 15] = [
        DropReason::SlowSubscriberQos0,
        DropReason::SlowSubscriberTimeout,
        DropReason::OfflineQos0,
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLargeForClient,
        DropReason::Refused,
        DropReason::NotAuthorized,
        DropReason::ReadNotAuthorized,
        DropReason::RetainedReplayLimit,
        DropReason::SharedGroupGone,
        DropReason::SharedGroupExhausted,
        DropReason::MoveAbandoned,
        DropReason::MoveDuplicate,
        DropReason::TooLargeForLink,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::SlowSubscriberQos0 => "slow_subscriber_qos0",
            DropReason::SlowSubscriberTimeout => "slow_subscriber_timeout",
            DropReason::OfflineQos0 => "offline_qos0",
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLargeForClient => "too_large_for_client",
            DropReason::Refused => "refused",
            DropReason::NotAuthorized => "not_authorized",
            DropReason::ReadNotAuthorized => "read_not_authorized",
            DropReason::RetainedReplayLimit => "retained_replay_limit",
            DropReason::SharedGroupGone => "shared_group_gone",
            DropReason::SharedGroupExhausted => "shared_group_exhausted",
            DropReason::MoveAbandoned => "move_abandoned",
            DropReason::MoveDuplicate => "move_duplicate",
            DropReason::TooLargeForLink => "too_large_for_link",
        }
    }
}

/// Which bound of the retained store refused a new retained topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainedLimit {
    /// `limits.max_retained_messages`.
    Messages,
    /// `limits.max_retained_bytes`.
    Bytes,
    /// `limits.max_retained_per_client`: the publisher's quota (PUBACK/PUBREC 0x97).
    ClientMessages,
    /// `limits.max_retained_bytes_per_client`.
    ClientBytes,
}

/// Why a shared-group message went to another member of its group
/// (`rampart_shared_redispatched_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedispatchReason {
    /// The member refused it (MQTT 5 PUBACK / PUBREC reason code 0x80 or more).
    Refused,
    /// The member did not acknowledge it within `limits.shared_ack_timeout_ms`.
    AckTimeout,
    /// The member's connection ended (or its offline session expired) while it held the message.
    MemberLeft,
}

/// A per-client bound that refused something (`rampart_client_limit_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientLimit {
    /// `limits.max_subscriptions_per_session`: SUBACK 0x97.
    Subscriptions,
    /// `limits.max_sessions_per_identity`: CONNACK 0x97.
    SessionsPerIdentity,
}

struct Metrics {
    connections: AtomicI64,
    connections_total: AtomicU64,
    connections_refused: AtomicU64,
    connections_deferred: AtomicU64,
    tls_handshakes_revoked: AtomicU64,
    messages_in: [AtomicU64; 3],
    messages_out: [AtomicU64; 3],
    dropped: [AtomicU64; DropReason::ALL.len()],
    malformed: AtomicU64,
    oversized: AtomicU64,
    queued: AtomicI64,
    retained_refused: [AtomicU64; 4],
    password_checks_in_progress: AtomicI64,
    password_checks_rate_limited: AtomicU64,
    password_check_waits: AtomicU64,
    client_limit_refusals: [AtomicU64; 2],
    suback_barrier_timeouts: AtomicU64,
    puback_cluster_timeouts: AtomicU64,
    puback_cluster_lost: AtomicU64,
    shared_redispatched: [AtomicU64; 3],
}

static METRICS: Metrics = Metrics {
    connections: AtomicI64::new(0),
    connections_total: AtomicU64::new(0),
    connections_refused: AtomicU64::new(0),
    connections_deferred: AtomicU64::new(0),
    tls_handshakes_revoked: AtomicU64::new(0),
    messages_in: [const { AtomicU64::new(0) }; 3],
    messages_out: [const { AtomicU64::new(0) }; 3],
    dropped: [const { AtomicU64::new(0) }; DropReason::ALL.len()],
    malformed: AtomicU64::new(0),
    oversized: AtomicU64::new(0),
    queued: AtomicI64::new(0),
    retained_refused: [const { AtomicU64::new(0) }; 4],
    password_checks_in_progress: AtomicI64::new(0),
    password_checks_rate_limited: AtomicU64::new(0),
    password_check_waits: AtomicU64::new(0),
    client_limit_refusals: [const { AtomicU64::new(0) }; 2],
    suback_barrier_timeouts: AtomicU64::new(0),
    puback_cluster_timeouts: AtomicU64::new(0),
    puback_cluster_lost: AtomicU64::new(0),
    shared_redispatched: [const { AtomicU64::new(0) }; 3],
};

/// A shared-group message went to another member.
pub fn shared_redispatched(reason: RedispatchReason) {
    METRICS.shared_redispatched[reason as usize].fetch_add(1, Ordering::Relaxed);
}

/// A PUBACK went out before every peer acknowledged the message (`puback = "cluster"`).
pub fn puback_cluster_timed_out() {
    METRICS.puback_cluster_timeouts.fetch_add(1, Ordering::Relaxed);
}

/// A publisher was disconnected without its acknowledgement: a message it published was dropped
/// on its way to another node (`puback = "cluster"`).
pub fn puback_cluster_lost() {
    METRICS.puback_cluster_lost.fetch_add(1, Ordering::Relaxed);
}

/// A SUBACK went out before every peer confirmed the new route (`suback_barrier = "ack"`).
pub fn suback_barrier_timed_out() {
    METRICS.suback_barrier_timeouts.fetch_add(1, Ordering::Relaxed);
}

/// Something a client asked for was refused by a per-client bound.
pub fn client_limit_refusal(limit: ClientLimit) {
    METRICS.client_limit_refusals[limit as usize].fetch_add(1, Ordering::Relaxed);
}

pub fn connection_opened() {
    METRICS.connections.fetch_add(1, Ordering::Relaxed);
    METRICS.connections_total.fetch_add(1, Ordering::Relaxed);
}

pub fn connection_closed() {
    METRICS.connections.fetch_sub(1, Ordering::Relaxed);
}

/// An accepted connection that waited for its turn (`limits.accept_rate`) before its handshake.
pub fn connection_deferred() {
    METRICS.connections_deferred.fetch_add(1, Ordering::Relaxed);
}

/// A connection refused before MQTT started (limit reached, TLS failure, CONNECT refused or timed out).
pub fn connection_refused() {
    METRICS.connections_refused.fetch_add(1, Ordering::Relaxed);
}

/// A TLS handshake refused because the client certificate is revoked (a CRL file or a
/// revocation of the state); also counted as a refused connection.
pub fn tls_handshake_revoked() {
    METRICS.tls_handshakes_revoked.fetch_add(1, Ordering::Relaxed);
}

pub fn message_in(qos: QoS) {
    METRICS.messages_in[qos as usize].fetch_add(1, Ordering::Relaxed);
}

pub fn message_out(qos: QoS) {
    METRICS.messages_out[qos as usize].fetch_add(1, Ordering::Relaxed);
}

pub fn dropped(reason: DropReason) {
    METRICS.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
}

pub fn malformed_packet() {
    METRICS.malformed.fetch_add(1, Ordering::Relaxed);
}

/// A connection closed for a packet larger than `limits.max_packet_size`.
pub fn oversized_packet() {
    METRICS.oversized.fetch_add(1, Ordering::Relaxed);
}

/// Messages added to (positive) or removed from (negative) session queues.
pub fn queued(delta: i64) {
    METRICS.queued.fetch_add(delta, Ordering::Relaxed);
}

/// A retained message for a new topic not stored because the retained store is full.
pub fn retained_refused(limit: RetainedLimit) {
    METRICS.retained_refused[limit as usize].fetch_add(1, Ordering::Relaxed);
}

/// A password check started (positive) or finished (negative).
pub fn password_checks_in_progress(delta: i64) {
    METRICS.password_checks_in_progress.fetch_add(delta, Ordering::Relaxed);
}

/// A password check refused by the per-source rate limit.
pub fn password_check_rate_limited() {
    METRICS.password_checks_rate_limited.fetch_add(1, Ordering::Relaxed);
}

/// A password check that had to wait for a free slot (all `password_checks_concurrent` busy).
pub fn password_check_waited() {
    METRICS.password_check_waits.fetch_add(1, Ordering::Relaxed);
}

/// Current number of open connections.
pub fn open_connections() -> i64 {
    METRICS.connections.load(Ordering::Relaxed)
}

/// Upper bounds of the certificate-expiry histogram's buckets: 1, 7, 14, 30, 90 and 365 days.
pub const CERT_EXPIRY_BUCKETS_SECS: [i64; 6] = [86_400, 604_800, 1_209_600, 2_592_000, 7_776_000, 31_536_000];

/// The time to expiry of the certificates of connected clients, as a Prometheus histogram
/// (an expired one counts as 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertExpiry {
    /// Certificates per bucket of [`CERT_EXPIRY_BUCKETS_SECS`] (not cumulative); the last entry
    /// counts those past the largest bound.
    pub buckets: [u64; CERT_EXPIRY_BUCKETS_SECS.len() + 1],
    pub sum_secs: i64,
    pub count: u64,
}

impl CertExpiry {
    pub fn observe(&mut self, secs_left: i64) {
        let secs_left = secs_left.max(0);
        let bucket = CERT_EXPIRY_BUCKETS_SECS.iter().position(|&bound| secs_left <= bound).unwrap_or(CERT_EXPIRY_BUCKETS_SECS.len());
        self.buckets[bucket] += 1;
        self.sum_secs += secs_left;
        self.count += 1;
    }
}

/// Broker-wide gauges sampled at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    /// Bytes of retained messages stored (topic + payload).
    pub retained_bytes: usize,
    /// The forwarding links to the other members (empty outside a cluster).
    pub links: Vec<LinkGauge>,
    /// Time to expiry of connected clients' certificates.
    pub cert_expiry: CertExpiry,
}

/// One forwarding link, as the metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkGauge {
    pub peer: u64,
    pub up: bool,
    /// Messages waiting to be sent to the peer.
    pub queued: usize,
    pub forwarded: u64,
    /// Messages dropped for the peer (queue or replay budget exceeded).
    pub dropped: u64,
    /// Filters the peer announced.
    pub routes: usize,
}

/// Renders every metric in the Prometheus text exposition format.
pub fn render(gauges: Gauges) -> String {
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, i64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
    metric("rampart_connections", "gauge", "Open client connections.", &[("", open_connections())]);
    metric("rampart_connections_total", "counter", "Client connections accepted.", &[("", load(&METRICS.connections_total))]);
    metric(
        "rampart_connections_refused_total",
        "counter",
        "Connections refused before or at CONNECT.",
        &[("", load(&METRICS.connections_refused))],
    );
    metric(
        "rampart_connections_deferred_total",
        "counter",
        "Accepted connections that waited for their turn (limits.accept_rate) before their handshake.",
        &[("", load(&METRICS.connections_deferred))],
    );
    metric(
        "rampart_tls_handshakes_revoked_total",
        "counter",
        "TLS handshakes refused because the client certificate is revoked (alert certificate_revoked).",
        &[("", load(&METRICS.tls_handshakes_revoked))],
    );
    // Counters indexed by an enum, with their labels in the order of its variants.
    let labelled = |labels: &[&'static str], counters: &[AtomicU64]| -> Vec<(&'static str, i64)> {
        labels.iter().zip(counters).map(|(l, c)| (*l, load(c))).collect()
    };
    let qos_labels = ["{qos=\"0\"}", "{qos=\"1\"}", "{qos=\"2\"}"];
    metric(
        "rampart_messages_received_total",
        "counter",
        "PUBLISH packets received from clients.",
        &labelled(&qos_labels, &METRICS.messages_in),
    );
    metric("rampart_messages_sent_total", "counter", "PUBLISH packets sent to clients.", &labelled(&qos_labels, &METRICS.messages_out));
    let drop_labels: Vec<String> = DropReason::ALL.iter().map(|r| format!("{{reason=\"{}\"}}", r.label())).collect();
    let drops: Vec<(&str, i64)> = drop_labels.iter().zip(&METRICS.dropped).map(|(l, c)| (l.as_str(), load(c))).collect();
    metric("rampart_messages_dropped_total", "counter", "Messages not delivered, by reason.", &drops);
    metric("rampart_malformed_packets_total", "counter", "Connections closed for a malformed packet.", &[("", load(&METRICS.malformed))]);
    metric(
        "rampart_oversized_packets_total",
        "counter",
        "Connections closed for a packet larger than max_packet_size.",
        &[("", load(&METRICS.oversized))],
    );
    metric("rampart_sessions", "gauge", "Sessions, online and offline.", &[("", gauges.sessions as i64)]);
    metric("rampart_subscriptions", "gauge", "Subscriptions in the index.", &[("", gauges.subscriptions as i64)]);
    metric("rampart_retained_messages", "gauge", "Retained messages stored.", &[("", gauges.retained as i64)]);
    metric(
        "rampart_retained_bytes",
        "gauge",
        "Bytes of retained messages stored (topic + payload).",
        &[("", gauges.retained_bytes as i64)],
    );
    let per_link = |value: fn(&LinkGauge) -> i64| -> Vec<(String, i64)> {
        gauges.links.iter().map(|l| (format!("{{peer=\"{}\"}}", l.peer), value(l))).collect()
    };
    for (name, kind, help, samples) in [
        ("rampart_forward_link_up", "gauge", "Whether the forwarding link to a peer is connected.", per_link(|l| i64::from(l.up))),
        ("rampart_forward_queued_messages", "gauge", "Messages waiting for a peer's link.", per_link(|l| l.queued as i64)),
        ("rampart_forward_messages_total", "counter", "Messages sent to a peer.", per_link(|l| l.forwarded as i64)),
        (
            "rampart_forward_dropped_total",
            "counter",
            "Messages dropped for a peer (queue or replay budget exceeded).",
            per_link(|l| l.dropped as i64),
        ),
        ("rampart_forward_peer_routes", "gauge", "Filters a peer announced.", per_link(|l| l.routes as i64)),
    ] {
        let samples: Vec<(&str, i64)> = samples.iter().map(|(labels, v)| (labels.as_str(), *v)).collect();
        metric(name, kind, help, &samples);
    }
    metric(
        "rampart_forward_suback_barrier_timeouts_total",
        "counter",
        "SUBACKs sent before every peer with a live link confirmed the new route (suback_barrier = \"ack\").",
        &[("", load(&METRICS.suback_barrier_timeouts))],
    );
    metric(
        "rampart_forward_puback_timeouts_total",
        "counter",
        "PUBACK/PUBREC sent before every peer acknowledged the message (puback = \"cluster\").",
        &[("", load(&METRICS.puback_cluster_timeouts))],
    );
    metric(
        "rampart_forward_puback_refused_total",
        "counter",
        "Publishers disconnected without their PUBACK/PUBREC because a message was dropped on its way to a peer (puback = \"cluster\").",
        &[("", load(&METRICS.puback_cluster_lost))],
    );
    metric(
        "rampart_shared_redispatched_total",
        "counter",
        "Shared-group messages given to another member of the group, by reason.",
        &labelled(&["{reason=\"refused\"}", "{reason=\"ack_timeout\"}", "{reason=\"member_left\"}"], &METRICS.shared_redispatched),
    );
    metric(
        "rampart_client_limit_refusals_total",
        "counter",
        "Subscriptions and sessions refused by a per-client bound, by limit.",
        &labelled(&["{limit=\"subscriptions_per_session\"}", "{limit=\"sessions_per_identity\"}"], &METRICS.client_limit_refusals),
    );
    metric(
        "rampart_retained_refused_total",
        "counter",
        "Retained messages not stored because a retained store limit or the publisher's quota was reached, by limit.",
        &labelled(
            &["{limit=\"messages\"}", "{limit=\"bytes\"}", "{limit=\"client_messages\"}", "{limit=\"client_bytes\"}"],
            &METRICS.retained_refused,
        ),
    );
    metric(
        "rampart_password_checks_in_progress",
        "gauge",
        "Password checks running now.",
        &[("", METRICS.password_checks_in_progress.load(Ordering::Relaxed))],
    );
    metric(
        "rampart_password_checks_rate_limited_total",
        "counter",
        "Password checks refused by the per-source rate limit.",
        &[("", load(&METRICS.password_checks_rate_limited))],
    );
    metric(
        "rampart_password_check_waits_total",
        "counter",
        "Password checks that waited for a free slot under the concurrency limit.",
        &[("", load(&METRICS.password_check_waits))],
    );
    metric("rampart_queued_messages", "gauge", "Messages waiting in session queues.", &[("", METRICS.queued.load(Ordering::Relaxed))]);
    render_cert_expiry(&mut out, &gauges.cert_expiry);
    out
}

/// `rampart_client_certificate_expiry_seconds`: a histogram with cumulative buckets.
fn render_cert_expiry(out: &mut String, expiry: &CertExpiry) {
    let name = "rampart_client_certificate_expiry_seconds";
    let _ = writeln!(out, "# HELP {name} Time to expiry of connected clients' certificates (0 once expired).\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in CERT_EXPIRY_BUCKETS_SECS.iter().map(|b| b.to_string()).chain(["+Inf".to_string()]).zip(expiry.buckets) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", expiry.sum_secs, expiry.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_counters() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
    }

    #[test]
    fn limit_metrics_are_rendered() {
        let mut cert_expiry = CertExpiry::default();
        for days in [-3, 0, 5, 5, 29, 400] {
            cert_expiry.observe(days * 86_400);
        }
        let text = render(Gauges { retained_bytes: 1234, cert_expiry, ..Gauges::default() });
        for line in [
            "rampart_client_certificate_expiry_seconds_bucket{le=\"86400\"} 2",
            "rampart_client_certificate_expiry_seconds_bucket{le=\"604800\"} 4",
            "rampart_client_certificate_expiry_seconds_bucket{le=\"2592000\"} 5",
            "rampart_client_certificate_expiry_seconds_bucket{le=\"31536000\"} 5",
            "rampart_client_certificate_expiry_seconds_bucket{le=\"+Inf\"} 6",
            "rampart_client_certificate_expiry_seconds_count 6",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} missing:\n{text}");
        }
        assert!(text.contains("\nrampart_retained_bytes 1234\n"), "{text}");
        for name in [
            "rampart_retained_refused_total{limit=\"messages\"}",
            "rampart_retained_refused_total{limit=\"bytes\"}",
            "rampart_retained_refused_total{limit=\"client_messages\"}",
            "rampart_retained_refused_total{limit=\"client_bytes\"}",
            "rampart_password_checks_in_progress",
            "rampart_password_checks_rate_limited_total",
            "rampart_password_check_waits_total",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name}: {text}");
        }
    }
}
