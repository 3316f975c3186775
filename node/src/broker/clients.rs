//! The clients connected to this node right now — who they are (identity, client type,
//! certificate) — for the admin API's session listing, and a way to disconnect one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

use crate::auth::state::ClientType;
use crate::telemetry::metrics::CertExpiry;

/// What the admin API shows of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub identity: String,
    pub client_type: ClientType,
    pub credential: String,
    pub cert_serial: String,
    pub cert_issuer: String,
    pub cert_not_after: i64,
    /// Seconds since the Unix epoch.
    pub connected_at: i64,
    pub peer: String,
}

/// Connections by registration key: what they are, and where to send a kick.
type Entries = HashMap<u64, (ClientInfo, watch::Sender<Option<String>>)>;

#[derive(Default)]
pub struct ConnectedClients {
    next: AtomicU64,
    clients: Mutex<Entries>,
}

/// A connection's entry; removed when dropped. `kicked` changes to the reason when an admin
/// disconnects the client.
pub struct Registration<'a> {
    clients: &'a ConnectedClients,
    key: u64,
    pub kicked: watch::Receiver<Option<String>>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.key);
    }
}

impl ConnectedClients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn register(&self, info: ClientInfo) -> Registration<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (kick, kicked) = watch::channel(None);
        self.lock().insert(key, (info, kick));
        Registration { clients: self, key, kicked }
    }

    /// Connected clients whose client id or identity contains `contains` and, with
    /// `expiring_before` (seconds since the epoch), whose certificate expires before it; at most
    /// `limit`, ordered by client id.
    pub fn list(&self, contains: &str, expiring_before: Option<i64>, limit: usize) -> Vec<ClientInfo> {
        let expiring = |info: &ClientInfo| expiring_before.is_none_or(|before| info.cert_not_after != 0 && info.cert_not_after < before);
        let mut found: Vec<ClientInfo> = (self.lock().values())
            .filter(|(info, _)| (info.client_id.contains(contains) || info.identity.contains(contains)) && expiring(info))
            .map(|(info, _)| info.clone())
            .collect();
        found.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        found.truncate(limit);
        found
    }

    /// The time to expiry at `now` (seconds since the epoch) of the certificates of the
    /// connected clients that presented one.
    pub fn cert_expiry(&self, now: i64) -> CertExpiry {
        let mut expiry = CertExpiry::default();
        for (info, _) in self.lock().values().filter(|(info, _)| info.cert_not_after != 0) {
            expiry.observe(info.cert_not_after - now);
        }
        expiry
    }

    /// Disconnects every connection of `client_id`; returns how many there were.
    pub fn kick(&self, client_id: &str, reason: &str) -> usize {
        let clients = self.lock();
        let mut kicked = 0;
        for (_, kick) in clients.values().filter(|(info, _)| info.client_id == client_id) {
            kick.send_replace(Some(reason.to_string()));
            kicked += 1;
        }
        kicked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(client_id: &str) -> ClientInfo {
        ClientInfo {
            client_id: client_id.into(),
            identity: format!("id-{client_id}"),
            client_type: ClientType::Device,
            credential: String::new(),
            cert_serial: String::new(),
            cert_issuer: String::new(),
            cert_not_after: 0,
            connected_at: 0,
            peer: String::new(),
        }
    }

    #[test]
    fn registered_clients_are_listed_kicked_and_removed_on_drop() {
        let clients = ConnectedClients::default();
        let mut a = clients.register(info("a"));
        let b = clients.register(info("b"));
        assert_eq!(clients.list("", None, 10).len(), 2);
        assert_eq!(clients.list("id-b", None, 10), vec![info("b")]);
        assert_eq!(clients.kick("a", "revoked"), 1);
        assert!(a.kicked.has_changed().unwrap());
        assert_eq!(a.kicked.borrow_and_update().as_deref(), Some("revoked"));
        drop(b);
        assert_eq!(clients.list("", None, 10).len(), 1);
        assert_eq!(clients.kick("b", "x"), 0);
    }

    #[test]
    fn clients_are_found_by_certificate_expiry_and_counted_in_the_histogram() {
        let clients = ConnectedClients::default();
        let day = 86_400;
        let with_expiry = |id: &str, not_after: i64| ClientInfo { cert_not_after: not_after, ..info(id) };
        let _kept = [
            clients.register(with_expiry("soon", 10 * day)),
            clients.register(with_expiry("later", 100 * day)),
            clients.register(info("password-client")),
        ];
        let soon: Vec<String> = clients.list("", Some(30 * day), 10).into_iter().map(|c| c.client_id).collect();
        assert_eq!(soon, ["soon"], "a client without a certificate never expires");
        let expiry = clients.cert_expiry(0);
        assert_eq!((expiry.count, expiry.sum_secs), (2, 110 * day));
        assert_eq!(expiry.buckets, [0, 0, 1, 0, 0, 1, 0], "10 days in the 14-day bucket, 100 in the 365-day one");
    }
}
