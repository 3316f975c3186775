//! Log events of libraries that a healthy node makes and an operator can do nothing about,
//! dropped before they are written. Each is matched by its source and its words, so anything
//! else those libraries say is still logged:
//!
//! - openraft's "A message will be ignored because vote changed" warning, for every vote answer
//!   that arrives after an election is won (every clean start of three or more nodes);
//! - openraft's five lines every 500 ms for a peer it cannot reach ("error replication",
//!   "RPCError" at ERROR, "backoff mode", "update progress error", "heartbeat error", and the
//!   same for votes): the Raft transport logs one line of its own instead, when the peer goes,
//!   once a minute while it stays away, and when it is back (`cluster::network`);
//! - rustls' "Illegal SNI extension: ignoring IP address presented as hostname" warning, for
//!   every client that connects to an IP address and sends it as SNI (mosquitto does; RFC 6066
//!   forbids it and rustls ignores it, which is all there is to do).

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The layer that drops them.
pub struct Routine;

impl<S: Subscriber> Layer<S> for Routine {
    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        !is_vote_changed_warning(metadata)
    }

    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        // Only warnings and errors are looked at; the rest costs nothing more.
        *event.metadata().level() > Level::WARN || !is_routine(event)
    }
}

/// openraft 0.9.25 warns "A message will be ignored because vote changed" for every vote
/// response that arrives after the election is already won (its own comment: "If it finished
/// voting, Candidate's vote is None"). That one call site is dropped, found by its place: openraft
/// is pinned, and the cluster test `a_clean_start_logs_no_warnings` notices if it moves.
fn is_vote_changed_warning(metadata: &Metadata<'_>) -> bool {
    metadata.level() == &Level::WARN
        && metadata.target() == "openraft::core::raft_core"
        && metadata.file().is_some_and(|f| f.ends_with("core/raft_core.rs"))
        && metadata.line() == Some(1553)
}

/// Whether a warning or error is one of the routine ones (see the module comment).
fn is_routine(event: &Event<'_>) -> bool {
    let mut text = Text::default();
    event.record(&mut text);
    let target = text.log_target.as_deref().unwrap_or(event.metadata().target());
    if target == "rustls::msgs::handshake" {
        return text.message.starts_with("Illegal SNI extension: ignoring IP address presented as hostname");
    }
    // Backoff happens only after an Unreachable error (openraft's replication loop).
    target.starts_with("openraft::")
        && (text.values.contains("Unreachable node:") || text.message.contains("backoff mode: drain events without processing them"))
}

/// The message, the `log` crate's target (for events from `log`) and every field value.
#[derive(Default)]
struct Text {
    message: String,
    log_target: Option<String>,
    values: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "log.target" => self.log_target = Some(value.to_string()),
            "message" => self.message = value.to_string(),
            _ => {}
        }
        self.values.push_str(value);
        self.values.push('\n');
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let value = format!("{value:?}");
        if field.name() == "message" {
            self.message.clone_from(&value);
        }
        self.values.push_str(&value);
        self.values.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects the messages of the events that reach it.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Written {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut text = Text::default();
            event.record(&mut text);
            self.0.lock().unwrap().push(text.message);
        }
    }

    #[test]
    fn routine_library_noise_is_dropped_and_everything_else_passes() {
        let written = Written::default();
        let subscriber = tracing_subscriber::registry().with(Routine).with(written.clone());
        tracing::subscriber::with_default(subscriber, || {
            let unreachable = "Unreachable node: tonic::status::Status: code: 'The service is currently unavailable'";
            tracing::error!(target: "openraft::replication", err = %unreachable, "RPCError");
            tracing::warn!(target: "openraft::replication", error = %unreachable, "error replication to target=3");
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error: {unreachable}, no update to inflight data");
            tracing::warn!(target: "openraft::replication", interval = ?std::time::Duration::from_millis(500), "ReplicationCore::backoff_drain_events backoff mode: drain events without processing them");
            tracing::error!(target: "openraft::replication", err = "Timeout: 250ms", "RPCError");
            tracing::error!(target: "openraft::replication", error = "StorageError: disk full", "error replication to target=3");
            tracing::info!(target: "openraft::replication", error = %unreachable, "kept below WARN: left to the level filter");
            tracing::warn!(target: "rampart_node::cluster::network", error = %unreachable, "cluster peer unreachable");
        });
        // What tracing-log makes of a `log` record: the `log` crate's target in a field.
        let (log_ip, log_other) = (
            "Illegal SNI extension: ignoring IP address presented as hostname ([49, 50, 55])",
            "Illegal SNI extension: duplicate host_name received",
        );
        let subscriber = tracing_subscriber::registry().with(Routine).with(written.clone());
        tracing::subscriber::with_default(subscriber, || {
            for message in [log_ip, log_other] {
                tracing::warn!(target: "log", { log.target = "rustls::msgs::handshake" }, "{message}");
            }
        });
        assert_eq!(
            *written.0.lock().unwrap(),
            [
                "RPCError",
                "error replication to target=3",
                "kept below WARN: left to the level filter",
                "cluster peer unreachable",
                log_other,
            ]
        );
    }
}
