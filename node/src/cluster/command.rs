//! What the cluster replicates: admin commands ([`AuthCmd`]) and their deterministic
//! application to the [`Replicated`] state — the `AuthState`, the audit trail and the request ids
//! already applied (so a retried command applies once). Pure: no IO, no clock, no randomness;
//! every node applying the same log reaches the same state.

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::auth::credentials::PutError;
use crate::auth::index::{check_rules, compile_providers, compile_revocation, validate_credential};
use crate::auth::state::{AuthState, ClientTypes, Credential, Defaults, Providers, Revocation, Role};

/// Audit entries kept in the replicated state (older ones are dropped).
pub const AUDIT_KEEP: usize = 10_000;
/// Request ids remembered for deduplicating retries.
const REQUESTS_KEEP: usize = 4096;

/// One admin change, as proposed to Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthCmd {
    /// Chosen by the node that accepted the admin call; a retry reuses it.
    pub request_id: u128,
    /// Identity of the admin certificate that made the call (or `bootstrap`).
    pub caller: String,
    /// When the call was accepted, seconds since the Unix epoch.
    pub at: i64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// The first state of a new cluster, from a node's `auth.state_file`; applies only once.
    /// Boxed: a state (its credential list's maps) is far larger than the other changes.
    Seed(Box<AuthState>),
    PutCredential {
        credential: Credential,
        create_only: bool,
    },
    DeleteCredential {
        name: String,
    },
    SetCredentialEnabled {
        name: String,
        enabled: bool,
    },
    /// Creates or replaces credentials, all or none.
    ImportCredentials(Vec<Credential>),
    PutRole(Role),
    DeleteRole {
        name: String,
    },
    SetDefaults(Defaults),
    SetClientTypes(ClientTypes),
    /// New revocations; ids, time and caller are filled in at apply.
    Revoke(Vec<Revocation>),
    /// The entries of a verified CRL; they replace the entries of earlier CRLs of that issuer.
    ImportCrl {
        issuer: String,
        revocations: Vec<Revocation>,
    },
    Unrevoke {
        ids: Vec<u64>,
    },
    /// Records a membership change made through the admin API (who and when) in the audit; it
    /// changes nothing else. The change itself is a Raft membership entry.
    RecordMembership {
        change: String,
    },
    /// Replaces the provider chain and its settings.
    SetProviders(Providers),
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Seed(_) => "seed",
            Op::PutCredential { .. } => "put_credential",
            Op::DeleteCredential { .. } => "delete_credential",
            Op::SetCredentialEnabled { .. } => "set_credential_enabled",
            Op::ImportCredentials(_) => "import_credentials",
            Op::PutRole(_) => "put_role",
            Op::DeleteRole { .. } => "delete_role",
            Op::SetDefaults(_) => "set_defaults",
            Op::SetClientTypes(_) => "set_client_types",
            Op::Revoke(_) => "revoke",
            Op::ImportCrl { .. } => "import_crl",
            Op::Unrevoke { .. } => "unrevoke",
            Op::RecordMembership { .. } => "membership",
            Op::SetProviders(_) => "set_providers",
        }
    }
}

/// Why a command was refused at apply (it is still in the log, and in the audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refused {
    Invalid,
    NotFound,
    AlreadyExists,
    /// Still referenced (a role used by credentials).
    InUse,
}

/// The result of applying one command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthResp {
    /// What changed, in words.
    pub detail: String,
    pub error: Option<(Refused, String)>,
    /// Ids of revocations created.
    pub revocation_ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub log_index: u64,
    pub time: i64,
    pub caller: String,
    pub action: String,
    pub detail: String,
    /// Empty when the change applied.
    pub error: String,
}

/// Everything the state machine holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Replicated {
    pub auth: AuthState,
    pub seeded: bool,
    pub next_revocation_id: u64,
    pub audit: VecDeque<AuditEntry>,
    /// Recently applied request ids and their results.
    pub requests: VecDeque<(u128, AuthResp)>,
}

type Outcome = Result<(String, Vec<u64>), (Refused, String)>;

fn invalid<T>(reason: impl Into<String>) -> Result<T, (Refused, String)> {
    Err((Refused::Invalid, reason.into()))
}

impl Replicated {
    /// Applies the command committed at `log_index`. Returns its result and whether the
    /// `AuthState` changed.
    pub fn apply(&mut self, log_index: u64, cmd: &AuthCmd) -> (AuthResp, bool) {
        if let Some((_, earlier)) = self.requests.iter().find(|(id, _)| *id == cmd.request_id) {
            return (earlier.clone(), false);
        }
        let outcome = self.apply_op(cmd);
        let changed = outcome.is_ok() && !matches!(cmd.op, Op::RecordMembership { .. });
        let resp = match outcome {
            Ok((detail, revocation_ids)) => AuthResp { detail, error: None, revocation_ids },
            Err(error) => AuthResp { detail: String::new(), error: Some(error), revocation_ids: Vec::new() },
        };
        self.audit.push_back(AuditEntry {
            log_index,
            time: cmd.at,
            caller: cmd.caller.clone(),
            action: cmd.op.name().into(),
            detail: if resp.error.is_some() { describe_request(&cmd.op) } else { resp.detail.clone() },
            error: resp.error.as_ref().map(|(_, e)| e.clone()).unwrap_or_default(),
        });
        while self.audit.len() > AUDIT_KEEP {
            self.audit.pop_front();
        }
        self.requests.push_back((cmd.request_id, resp.clone()));
        while self.requests.len() > REQUESTS_KEEP {
            self.requests.pop_front();
        }
        (resp, changed)
    }

    fn apply_op(&mut self, cmd: &AuthCmd) -> Outcome {
        let auth = &mut self.auth;
        match &cmd.op {
            Op::Seed(state) => {
                if self.seeded {
                    return Err((Refused::AlreadyExists, "the cluster already has its initial state".into()));
                }
                crate::auth::index::AuthIndex::build((**state).clone()).or_else(invalid)?;
                *auth = (**state).clone();
                self.seeded = true;
                Ok((format!("initial state: {} credentials, {} roles", auth.credentials.len(), auth.roles.len()), vec![]))
            }
            Op::PutCredential { credential, create_only } => {
                let existing = auth.credentials.get(&credential.name).is_some();
                if existing && *create_only {
                    return Err((Refused::AlreadyExists, format!("credential {:?} already exists", credential.name)));
                }
                check_new_credentials(auth, std::slice::from_ref(credential))?;
                auth.credentials.put_all([credential.clone()]).map_err(put_refused)?;
                let verb = if existing { "replaced" } else { "created" };
                Ok((format!("credential {:?} {verb}", credential.name), vec![]))
            }
            Op::ImportCredentials(credentials) => {
                check_new_credentials(auth, credentials)?;
                let replaced = auth.credentials.put_all(credentials.iter().cloned()).map_err(put_refused)?;
                Ok((format!("{} imported ({replaced} replaced)", count(credentials.len(), "credential")), vec![]))
            }
            Op::DeleteCredential { name } => {
                auth.credentials.remove(name).ok_or_else(|| not_found(name))?;
                Ok((format!("credential {name:?} deleted"), vec![]))
            }
            Op::SetCredentialEnabled { name, enabled } => {
                let mut credential = auth.credentials.get(name).cloned().ok_or_else(|| not_found(name))?;
                credential.enabled = *enabled;
                auth.credentials.put_all([credential]).map_err(put_refused)?;
                Ok((format!("credential {name:?} {}", if *enabled { "enabled" } else { "disabled" }), vec![]))
            }
            Op::PutRole(role) => {
                if role.name.is_empty() {
                    return invalid("role.name: must not be empty");
                }
                check_rules(&role.rules).map_err(|e| (Refused::Invalid, format!("role {:?}: {e}", role.name)))?;
                let verb = match auth.roles.iter_mut().find(|r| r.name == role.name) {
                    Some(existing) => {
                        *existing = role.clone();
                        "replaced"
                    }
                    None => {
                        auth.roles.push(role.clone());
                        "created"
                    }
                };
                Ok((format!("role {:?} {verb}", role.name), vec![]))
            }
            Op::DeleteRole { name } => {
                let i = auth.roles.iter().position(|r| r.name == *name).ok_or((Refused::NotFound, format!("no role {name:?}")))?;
                if let Some(user) = auth.credentials.iter().find(|c| c.roles.contains(name)) {
                    return Err((Refused::InUse, format!("role {name:?} is used by credential {:?}", user.name)));
                }
                auth.roles.remove(i);
                Ok((format!("role {name:?} deleted"), vec![]))
            }
            Op::SetDefaults(defaults) => {
                check_rules(&defaults.rules).map_err(|e| (Refused::Invalid, format!("defaults.rules: {e}")))?;
                check_rules(&defaults.anonymous_rules).map_err(|e| (Refused::Invalid, format!("defaults.anonymous_rules: {e}")))?;
                auth.defaults = defaults.clone();
                Ok(("defaults replaced".into(), vec![]))
            }
            Op::SetClientTypes(types) => {
                auth.client_types = types.clone();
                Ok(("client type settings replaced".into(), vec![]))
            }
            Op::Revoke(revocations) => {
                let ids = self.add_revocations(revocations, cmd, "api")?;
                Ok((format!("{} added", count(ids.len(), "revocation")), ids))
            }
            Op::ImportCrl { issuer, revocations } => {
                let before = self.auth.revocations.len();
                self.auth.revocations.retain(|r| !(r.source == "crl" && r.issuer.as_deref() == Some(issuer)));
                let dropped = before - self.auth.revocations.len();
                let ids = self.add_revocations(revocations, cmd, "crl")?;
                Ok((format!("CRL of {issuer}: {} (replacing {dropped})", count(ids.len(), "entry")), ids))
            }
            Op::RecordMembership { change } => Ok((change.clone(), vec![])),
            Op::SetProviders(providers) => {
                compile_providers(providers).or_else(invalid)?;
                auth.providers = providers.clone();
                let order: Vec<String> = providers.order.iter().map(ToString::to_string).collect();
                Ok((format!("providers set: {}", order.join(", ")), vec![]))
            }
            Op::Unrevoke { ids } => {
                let wanted: HashSet<u64> = ids.iter().copied().collect();
                let present: HashSet<u64> = auth.revocations.iter().map(|r| r.id).filter(|id| wanted.contains(id)).collect();
                if let Some(missing) = ids.iter().find(|id| !present.contains(id)) {
                    return Err((Refused::NotFound, format!("no revocation with id {missing}")));
                }
                auth.revocations.retain(|r| !wanted.contains(&r.id));
                Ok((format!("{} removed", count(wanted.len(), "revocation")), vec![]))
            }
        }
    }

    fn add_revocations(&mut self, revocations: &[Revocation], cmd: &AuthCmd, source: &str) -> Result<Vec<u64>, (Refused, String)> {
        for (i, r) in revocations.iter().enumerate() {
            compile_revocation(r).map_err(|e| (Refused::Invalid, format!("revocations[{i}]: {e}")))?;
        }
        let mut ids = Vec::with_capacity(revocations.len());
        for r in revocations {
            self.next_revocation_id += 1;
            ids.push(self.next_revocation_id);
            self.auth.revocations.push(Revocation {
                id: self.next_revocation_id,
                revoked_at: cmd.at,
                revoked_by: cmd.caller.clone(),
                source: source.into(),
                serial: r.serial.as_deref().map(|s| crate::auth::serial::normalize_serial(s).unwrap_or_else(|_| s.to_string())),
                ..r.clone()
            });
        }
        Ok(ids)
    }
}

fn not_found(name: &str) -> (Refused, String) {
    (Refused::NotFound, format!("no credential {name:?}"))
}

/// A credential the list refused: its identity, user name or client id is another's, or it is
/// listed twice.
fn put_refused(e: PutError) -> (Refused, String) {
    let kind = if e.taken { Refused::AlreadyExists } else { Refused::Invalid };
    (kind, format!("credential {:?}: {}", e.credential, e.reason))
}

/// Checks each credential about to be created or replaced on its own; their uniqueness is the
/// list's to check as it takes them (`CredentialList::put_all`).
fn check_new_credentials(auth: &AuthState, new: &[Credential]) -> Result<(), (Refused, String)> {
    let roles: HashSet<&str> = auth.roles.iter().map(|r| r.name.as_str()).collect();
    for c in new {
        validate_credential(c, |r| roles.contains(r)).map_err(|e| (Refused::Invalid, format!("credential {:?}: {e}", c.name)))?;
    }
    Ok(())
}

/// `1 revocation`, `2 revocations`, `3 entries`.
fn count(n: usize, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// A short description of a refused request, for the audit trail.
fn describe_request(op: &Op) -> String {
    match op {
        Op::PutCredential { credential, .. } => format!("credential {:?}", credential.name),
        Op::DeleteCredential { name } | Op::SetCredentialEnabled { name, .. } => format!("credential {name:?}"),
        Op::ImportCredentials(c) => count(c.len(), "credential"),
        Op::PutRole(role) => format!("role {:?}", role.name),
        Op::DeleteRole { name } => format!("role {name:?}"),
        Op::Revoke(r) => count(r.len(), "revocation"),
        Op::ImportCrl { issuer, .. } => format!("CRL of {issuer}"),
        Op::Unrevoke { ids } => format!("revocations {ids:?}"),
        Op::RecordMembership { change } => change.clone(),
        Op::Seed(_) | Op::SetDefaults(_) | Op::SetClientTypes(_) | Op::SetProviders(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::state::{ClientType, ProviderKind, X509Match};

    fn device(name: &str, identity: &str) -> Credential {
        Credential {
            name: name.into(),
            enabled: true,
            client_type: ClientType::Device,
            roles: vec![],
            rules: vec![],
            x509: Some(X509Match { identity: Some(identity.into()), identity_regex: None, priority: 0, issuer: None }),
            password: None,
        }
    }

    fn cmd(request_id: u128, op: Op) -> AuthCmd {
        AuthCmd { request_id, caller: "admin".into(), at: 1_700_000_000, op }
    }

    #[test]
    fn credentials_are_created_replaced_and_deleted() {
        let mut state = Replicated::default();
        let (resp, changed) = state.apply(1, &cmd(1, Op::PutCredential { credential: device("d1", "d1"), create_only: true }));
        assert!(changed && resp.error.is_none(), "{resp:?}");
        let (resp, _) = state.apply(2, &cmd(2, Op::PutCredential { credential: device("d1", "d1"), create_only: true }));
        assert_eq!(resp.error.unwrap().0, Refused::AlreadyExists);
        let (resp, _) = state.apply(3, &cmd(3, Op::PutCredential { credential: device("d2", "d1"), create_only: false }));
        assert!(resp.error.unwrap().1.contains("already used by credential \"d1\""));
        state.apply(4, &cmd(4, Op::DeleteCredential { name: "d1".into() }));
        assert!(state.auth.credentials.is_empty());
        let (resp, changed) = state.apply(5, &cmd(5, Op::DeleteCredential { name: "d1".into() }));
        assert_eq!((resp.error.unwrap().0, changed), (Refused::NotFound, false));
        assert_eq!(state.audit.len(), 5, "refused commands are audited too");
        assert_eq!(state.audit[1].error, "credential \"d1\" already exists");
    }

    #[test]
    fn a_retried_request_applies_once() {
        let mut state = Replicated::default();
        let revoke = cmd(7, Op::Revoke(vec![Revocation { issuer: Some("CN=CA".into()), serial: Some("0a".into()), ..Default::default() }]));
        let (first, _) = state.apply(1, &revoke);
        let (again, changed) = state.apply(2, &revoke);
        assert_eq!((first.revocation_ids.clone(), changed), (vec![1], false));
        assert_eq!(first, again);
        assert_eq!(state.auth.revocations.len(), 1);
        assert_eq!(state.auth.revocations[0].serial.as_deref(), Some("0A"), "serials are normalized");
    }

    #[test]
    fn providers_are_checked_at_apply() {
        let mut state = Replicated::default();
        let jwt_without_settings = Providers { order: vec![ProviderKind::Jwt], jwt: None, http: None };
        let (resp, changed) = state.apply(1, &cmd(1, Op::SetProviders(jwt_without_settings)));
        assert!(!changed && resp.error.unwrap().1.contains("providers.jwt: required"));
        let settings: crate::auth::state::JwtSettings = toml::from_str("hmac_secret = \"0123456789abcdef0123456789abcdef\"").unwrap();
        let providers = Providers { order: vec![ProviderKind::Basic, ProviderKind::Jwt], jwt: Some(settings), http: None };
        let (resp, changed) = state.apply(2, &cmd(2, Op::SetProviders(providers.clone())));
        assert!(changed, "{resp:?}");
        assert_eq!(resp.detail, "providers set: basic, jwt");
        assert_eq!(state.auth.providers, providers);
    }

    #[test]
    fn imports_are_all_or_nothing() {
        let mut state = Replicated::default();
        let batch = vec![device("a", "a"), device("b", "b"), device("c", "a")];
        let (resp, changed) = state.apply(1, &cmd(1, Op::ImportCredentials(batch)));
        assert!(!changed && resp.error.is_some());
        assert!(state.auth.credentials.is_empty());
        let (resp, _) = state.apply(2, &cmd(2, Op::ImportCredentials(vec![device("a", "a"), device("b", "b")])));
        assert_eq!(resp.detail, "2 credentials imported (0 replaced)");
    }

    #[test]
    fn crl_imports_replace_the_earlier_crl_of_the_issuer_and_unrevoke_undoes() {
        let mut state = Replicated::default();
        let entry = |serial: &str| Revocation { issuer: Some("CN=CA".into()), serial: Some(serial.into()), ..Default::default() };
        state.apply(1, &cmd(1, Op::ImportCrl { issuer: "CN=CA".into(), revocations: vec![entry("01"), entry("02")] }));
        state.apply(2, &cmd(2, Op::Revoke(vec![entry("03")])));
        let (resp, _) = state.apply(3, &cmd(3, Op::ImportCrl { issuer: "CN=CA".into(), revocations: vec![entry("02")] }));
        assert_eq!(resp.detail, "CRL of CN=CA: 1 entry (replacing 2)");
        let serials: Vec<_> = state.auth.revocations.iter().map(|r| r.serial.clone().unwrap()).collect();
        assert_eq!(serials, ["03", "02"]);
        let (resp, _) = state.apply(4, &cmd(4, Op::Unrevoke { ids: vec![3, 99] }));
        assert_eq!(resp.error.unwrap().0, Refused::NotFound);
        let (resp, _) = state.apply(5, &cmd(5, Op::Unrevoke { ids: vec![3] }));
        assert_eq!(resp.detail, "1 revocation removed");
        assert_eq!(state.auth.revocations.len(), 1);
    }

    #[test]
    fn bad_revocations_and_roles_in_use_are_refused() {
        let mut state = Replicated::default();
        let no_issuer = Revocation { serial: Some("01".into()), ..Default::default() };
        let bad_regex = Revocation { identity_regex: Some("(".into()), ..Default::default() };
        for (id, r) in [no_issuer, bad_regex, Revocation::default()].into_iter().enumerate() {
            let (resp, _) = state.apply(1, &cmd(100 + id as u128, Op::Revoke(vec![r])));
            assert_eq!(resp.error.unwrap().0, Refused::Invalid);
        }
        state.apply(2, &cmd(10, Op::PutRole(Role { name: "r".into(), rules: vec![] })));
        let mut d = device("d", "d");
        d.roles = vec!["r".into()];
        state.apply(3, &cmd(11, Op::PutCredential { credential: d, create_only: false }));
        let (resp, _) = state.apply(4, &cmd(12, Op::DeleteRole { name: "r".into() }));
        assert_eq!(resp.error.unwrap().0, Refused::InUse);
    }

    #[test]
    fn membership_records_are_audited_and_change_nothing_else() {
        let mut state = Replicated::default();
        let (resp, changed) = state.apply(3, &cmd(1, Op::RecordMembership { change: "node 4 added as a voter".into() }));
        assert!(!changed && resp.error.is_none());
        assert_eq!((state.audit[0].action.as_str(), state.audit[0].detail.as_str()), ("membership", "node 4 added as a voter"));
        assert_eq!(state.auth, AuthState::default());
    }

    #[test]
    fn the_seed_applies_once() {
        let mut state = Replicated::default();
        let seed = AuthState { credentials: vec![device("a", "a")].try_into().unwrap(), ..Default::default() };
        assert!(state.apply(1, &cmd(1, Op::Seed(Box::new(seed.clone())))).1);
        assert!(!state.apply(2, &cmd(2, Op::Seed(Box::default()))).1);
        assert_eq!(state.auth, seed);
    }
}
