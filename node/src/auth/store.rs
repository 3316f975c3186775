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

use super::identity::PeerCertificate;
use super::index::{AuthIndex, Grant};
use super::policy::Principal;
use super::state::{AuthState, Revocation};
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

/// A revoked certificate and the rule that revokes it. Displayed as the refusal's reason:
/// `certificate 0A:1B of O=Rampart, CN=Fleet CA is revoked (keyCompromise) by revocation 7 (serial "0A:1B", issuer "…")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Revoked {
    pub serial: String,
    pub issuer: String,
    pub by: RevokedBy,
}

/// What revokes a certificate.
#[derive(Debug, Clone, PartialEq)]
pub enum RevokedBy {
    /// A CRL in a listener's `crl_files`.
    CrlFile,
    /// A revocation of the state: the state file, the admin API, or an entry of an imported CRL.
    Revocation(Revocation),
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "certificate {} of {} is revoked", self.serial, self.issuer)?;
        if let RevokedBy::Revocation(r) = &self.by {
            if !r.reason.is_empty() {
                write!(f, " ({})", r.reason)?;
            }
        }
        write!(f, " by {}", self.by)
    }
}

impl std::fmt::Display for RevokedBy {
    /// The rule as an operator finds it: `rampart admin revocations list` shows the id, the
    /// state file the fields.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = match self {
            RevokedBy::CrlFile => return f.write_str("a CRL in the listener's crl_files"),
            RevokedBy::Revocation(r) => r,
        };
        f.write_str(match r.source.as_str() {
            "crl" => "imported CRL entry",
            "" if r.id == 0 => "state file revocation",
            _ => "revocation",
        })?;
        if r.id != 0 {
            write!(f, " {}", r.id)?;
        }
        let fields = [
            r.serial.as_ref().map(|s| format!("serial {s:?}")),
            r.issuer.as_ref().map(|i| format!("issuer {i:?}")),
            r.identity_regex.as_ref().map(|p| format!("identity_regex {p:?}")),
            r.issued_before.map(|t| {
                let at = time::OffsetDateTime::from_unix_timestamp(t).ok();
                let text = at.and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok());
                format!("issued_before {}", text.unwrap_or_else(|| t.to_string()))
            }),
        ];
        write!(f, " ({})", fields.into_iter().flatten().collect::<Vec<_>>().join(", "))
    }
}

/// Reads a state file; errors name the file and the key. A `jwks_file` in `[providers.jwt]`
/// (relative to the state file) is read into `jwks`, so the replicated state carries the
/// document, not a path that means nothing on other nodes.
pub fn read_state(path: &Path) -> anyhow::Result<AuthState> {
    let at = |key: &str, e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {key}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let jwt = table.get_mut("providers").and_then(|p| p.get_mut("jwt")).and_then(toml::Value::as_table_mut);
    if let Some(file) = jwt.as_ref().and_then(|jwt| jwt.get("jwks_file")) {
        let key = "providers.jwt.jwks_file";
        let file = path.parent().unwrap_or(Path::new(".")).join(file.as_str().ok_or_else(|| at(key, &"must be a path"))?);
        let jwks = std::fs::read_to_string(&file).map_err(|e| at(key, &format_args!("{}: {e}", file.display())))?;
        let jwt = jwt.expect("looked up above");
        if jwt.contains_key("jwks") {
            return Err(at(key, &"give jwks or jwks_file, not both"));
        }
        jwt.remove("jwks_file");
        jwt.insert("jwks".into(), jwks.into());
    }
    serde_path_to_error::deserialize(toml::Value::Table(table))
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

    /// The CONNECT decision (and the re-check of a live connection): revocations first (see
    /// [`AuthStore::revocation`]), then the credentials of the index in force.
    pub fn authorize(&self, principal: &Principal, client_id: &str) -> Result<Grant, Refusal> {
        if let Some(reason) = self.out_of_service().as_ref() {
            return Err(Refusal { code: mqttbytes::v5::ConnectReturnCode::ServerUnavailable, reason: reason.clone() });
        }
        let index = self.current();
        if let Some(cert) = &principal.certificate {
            if let Some(revoked) = self.revocation_in(&index, cert) {
                return Err(Refusal { code: mqttbytes::v5::ConnectReturnCode::NotAuthorized, reason: revoked.to_string() });
            }
        }
        index.authorize(principal, client_id)
    }

    /// Whether a certificate is revoked, and by what: a listener's CRL file in force, else a
    /// revocation of the state (issuer, serial, identity regex, issued before; see
    /// [`AuthIndex::revocation_of`]). The one decision the TLS handshake, CONNECT, live
    /// connections and the gRPC callers share.
    pub fn revocation(&self, cert: &PeerCertificate) -> Option<Revoked> {
        self.revocation_in(&self.current(), cert)
    }

    fn revocation_in(&self, index: &AuthIndex, cert: &PeerCertificate) -> Option<Revoked> {
        let by = if self.crl_revoked.load().contains(&(cert.issuer.clone(), cert.serial.clone())) {
            RevokedBy::CrlFile
        } else {
            RevokedBy::Revocation(index.revocation_of(cert)?.clone())
        };
        Some(Revoked { serial: cert.serial.clone(), issuer: cert.issuer.clone(), by })
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

#[cfg(test)]
mod tests {
    use super::*;

    const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "k1"}]}"#;

    fn state_file(dir: &Path, jwt: &str) -> PathBuf {
        let file = dir.join("auth.toml");
        std::fs::write(&file, format!("[providers]\norder = [\"jwt\"]\n[providers.jwt]\n{jwt}\n")).unwrap();
        file
    }

    fn certificate(identity: &str, serial: &str, not_before: i64) -> PeerCertificate {
        PeerCertificate { identity: identity.into(), serial: serial.into(), issuer: "CN=Fleet CA".into(), not_before, not_after: 0 }
    }

    #[test]
    fn revocations_by_serial_rule_and_crl_file_decide_connect_and_name_their_rule() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.toml");
        std::fs::write(
            &file,
            "[defaults]\nunknown_certificate = \"default_rules\"\n\
             [[revocations]]\nissuer = \"CN=Fleet CA\"\nserial = \"0a:0b\"\nreason = \"keyCompromise\"\n\
             [[revocations]]\nissuer = \"CN=Fleet CA\"\nidentity_regex = \"plant-7-.*\"\nissued_before = 1000\n",
        )
        .unwrap();
        let store = AuthStore::open(Some(file)).unwrap();
        store.set_crl_revocations(HashSet::from([("CN=Fleet CA".to_string(), "0C".to_string())]));
        let principal = |cert: PeerCertificate| Principal { certificate: Some(cert), ..Principal::default() };
        for (cert, rule) in [
            (certificate("plc-1", "0A:0B", 0), "state file revocation (serial \"0a:0b\", issuer \"CN=Fleet CA\")"),
            (
                certificate("plant-7-a", "01", 999),
                "state file revocation (issuer \"CN=Fleet CA\", identity_regex \"plant-7-.*\", issued_before 1970-01-01T00:16:40Z)",
            ),
            (certificate("plc-2", "0C", 0), "a CRL in the listener's crl_files"),
        ] {
            let revoked = store.revocation(&cert).unwrap_or_else(|| panic!("{cert:?} is not revoked"));
            assert_eq!(revoked.by.to_string(), rule);
            let refusal = store.authorize(&principal(cert.clone()), &cert.identity).unwrap_err();
            assert_eq!(refusal.reason, revoked.to_string(), "CONNECT refuses with the same decision");
            assert!(refusal.reason.starts_with(&format!("certificate {} of CN=Fleet CA is revoked", cert.serial)), "{}", refusal.reason);
        }
        assert!(store.revocation(&certificate("plc-1", "0A:0B", 0)).unwrap().to_string().contains("revoked (keyCompromise) by"));
        let replicated = |source: &str| {
            let r = Revocation { id: 7, serial: Some("0A".into()), source: source.into(), ..Revocation::default() };
            RevokedBy::Revocation(r).to_string()
        };
        assert_eq!(replicated("api"), "revocation 7 (serial \"0A\")", "as `rampart admin revocations` lists it");
        assert_eq!(replicated("crl"), "imported CRL entry 7 (serial \"0A\")");
        for cert in [certificate("plant-7-a", "01", 1000), certificate("plant-8-a", "01", 0), certificate("plc-1", "0D", 0)] {
            assert_eq!(store.revocation(&cert), None, "{cert:?}");
            assert!(store.authorize(&principal(cert.clone()), &cert.identity).is_ok(), "{cert:?}");
        }
    }

    #[test]
    fn a_jwks_file_is_read_into_the_state_relative_to_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.json"), JWKS).unwrap();
        let state = read_state(&state_file(dir.path(), "jwks_file = \"keys.json\"")).unwrap();
        assert_eq!(state.providers.jwt.unwrap().jwks.as_deref(), Some(JWKS));
        load_state(&state_file(dir.path(), "jwks_file = \"keys.json\"")).expect("the key compiles");
    }

    #[test]
    fn jwks_file_errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_state(&state_file(dir.path(), "jwks_file = \"absent.json\"")).unwrap_err().to_string();
        assert!(missing.contains("auth.toml: providers.jwt.jwks_file:") && missing.contains("absent.json"), "{missing}");
        std::fs::write(dir.path().join("keys.json"), JWKS).unwrap();
        let both = read_state(&state_file(dir.path(), "jwks_file = \"keys.json\"\njwks = '{}'")).unwrap_err().to_string();
        assert!(both.contains("give jwks or jwks_file, not both"), "{both}");
        let typo = read_state(&state_file(dir.path(), "jwks_fil = \"keys.json\"")).unwrap_err().to_string();
        assert!(typo.contains("providers.jwt") && typo.contains("jwks_fil"), "{typo}");
    }
}
