//! The node's current `AuthIndex` and the certificates revoked by the listeners' CRL files: read
//! lock-free by every CONNECT, swapped whole when the state file or the CRLs are re-read
//! (SIGHUP) or the cluster applies a change, with a change signal that live connections watch
//! to re-check their client (revoked, disabled, deleted: disconnected; otherwise new
//! permissions apply). A cluster node that is not a member (not yet added, or removed) serves
//! no client: every CONNECT is refused and live connections are closed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::index::{AuthIndex, Grant};
use super::policy::Principal;
use super::state::AuthState;
use crate::auth::Refusal;

/// Why a cluster node refuses clients before it has seen itself in the membership.
pub const NOT_YET_A_MEMBER: &str = "this node is not a cluster member yet";

pub struct AuthStore {
    file: Option<PathBuf>,
    current: ArcSwap<AuthIndex>,
    /// (issuer DN, serial) revoked by the CRL files in force.
    crl_revoked: ArcSwap<HashSet<(String, String)>>,
    /// Why this node serves no client at all (a cluster node that is not a member), if so.
    out_of_service: ArcSwap<Option<String>>,
    changed: watch::Sender<u64>,
    /// The `http` provider's client and decision cache (node settings from `[auth.http]`).
    http: std::sync::OnceLock<super::http::HttpDelegate>,
}

/// Reads a state file; errors name the file and the key.
pub fn read_state(path: &Path) -> anyhow::Result<AuthState> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_path_to_error::deserialize(toml::Deserializer::new(&text))
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner().message()))
}

/// Reads and compiles a state file.
pub fn load_state(path: &Path) -> anyhow::Result<AuthIndex> {
    AuthIndex::build(read_state(path)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

impl AuthStore {
    /// Loads `file` (or no authorization when `None`).
    pub fn open(file: Option<PathBuf>) -> anyhow::Result<AuthStore> {
        let index = match &file {
            Some(path) => load_state(path)?,
            None => AuthIndex::open(),
        };
        Ok(AuthStore {
            file,
            current: ArcSwap::from_pointee(index),
            crl_revoked: ArcSwap::default(),
            out_of_service: ArcSwap::default(),
            changed: watch::channel(0).0,
            http: std::sync::OnceLock::new(),
        })
    }

    /// The CONNECT decision (and the re-check of a live connection): CRL revocations first, then
    /// the index in force.
    pub fn authorize(&self, principal: &Principal, client_id: &str) -> Result<Grant, Refusal> {
        if let Some(reason) = self.out_of_service().as_ref() {
            return Err(Refusal { code: mqttbytes::v5::ConnectReturnCode::ServerUnavailable, reason: reason.clone() });
        }
        if let Some(cert) = &principal.certificate {
            if self.crl_revoked.load().contains(&(cert.issuer.clone(), cert.serial.clone())) {
                let reason = format!("certificate {} of {} is revoked by a CRL", cert.serial, cert.issuer);
                return Err(Refusal { code: mqttbytes::v5::ConnectReturnCode::NotAuthorized, reason });
            }
        }
        self.current().authorize(principal, client_id)
    }

    /// Whether a certificate is revoked, by a CRL file in force or in the state.
    pub fn is_revoked(&self, cert: &crate::auth::identity::PeerCertificate) -> bool {
        self.crl_revoked.load().contains(&(cert.issuer.clone(), cert.serial.clone())) || self.current().revocation_of(cert).is_some()
    }

    /// For a cluster node: nothing is allowed until the replicated state is applied, and no
    /// client is served until the node knows it is a member.
    pub fn replicated() -> AuthStore {
        let empty = AuthIndex::build(AuthState::default()).expect("the empty state is valid");
        AuthStore {
            file: None,
            current: ArcSwap::from_pointee(empty),
            crl_revoked: ArcSwap::default(),
            out_of_service: ArcSwap::from_pointee(Some(NOT_YET_A_MEMBER.to_string())),
            changed: watch::channel(0).0,
            http: std::sync::OnceLock::new(),
        }
    }

    /// Sets this node's HTTP delegation client (once, at start; later calls change nothing).
    pub fn set_http(&self, delegate: super::http::HttpDelegate) {
        let _ = self.http.set(delegate);
    }

    /// This node's HTTP delegation client, if set.
    pub fn http(&self) -> Option<&super::http::HttpDelegate> {
        self.http.get()
    }

    /// Why no client is served, if none is (see [`AuthStore::set_out_of_service`]).
    pub fn out_of_service(&self) -> Arc<Option<String>> {
        self.out_of_service.load_full()
    }

    /// Stops serving every client, with a reason (live connections are told to re-check, so they
    /// are disconnected), or serves again with `None`.
    pub fn set_out_of_service(&self, reason: Option<String>) {
        if *self.out_of_service.load_full() != reason {
            self.out_of_service.store(Arc::new(reason));
            self.changed.send_modify(|generation| *generation += 1);
        }
    }

    /// Puts a new index in force and signals live connections.
    pub fn install(&self, index: AuthIndex) {
        self.current.store(Arc::new(index));
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Puts a new set of CRL revocations in force and signals live connections.
    pub fn set_crl_revocations(&self, revoked: HashSet<(String, String)>) {
        self.crl_revoked.store(Arc::new(revoked));
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub fn current(&self) -> Arc<AuthIndex> {
        self.current.load_full()
    }

    /// A receiver that changes whenever a new index is in force.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Re-reads the state file; on error the index in force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(path) = &self.file else { return Ok(()) };
        self.install(load_state(path)?);
        Ok(())
    }
}
