//! `AuthState`: the authentication and authorization data of a fleet, as plain serde data —
//! credentials, roles, default rules, client-type settings and revocations. A standalone node
//! reads it from a TOML file; a cluster replicates it through Raft (see `cluster::command`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthState {
    /// Shared with the compiled index, so changes elsewhere do not copy it.
    #[serde(default)]
    pub credentials: Arc<Vec<Credential>>,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub revocations: Vec<Revocation>,
    #[serde(default)]
    pub client_types: ClientTypes,
}

/// Settings per client type; unset values fall back to the node's `[limits]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTypes {
    #[serde(default)]
    pub device: ClientTypeSettings,
    #[serde(default)]
    pub application: ClientTypeSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTypeSettings {
    /// Offline queue limit of sessions of this type.
    pub max_queued_messages: Option<usize>,
}

impl ClientTypes {
    pub fn of(&self, client_type: ClientType) -> &ClientTypeSettings {
        match client_type {
            ClientType::Device => &self.device,
            ClientType::Application => &self.application,
        }
    }
}

/// How a client is recognised and what it may do: by certificate (`x509`) or by user name and
/// password (`password`), never both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Unique name, used in logs and by the admin API.
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub client_type: ClientType,
    /// Names of roles whose rules apply too.
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    pub x509: Option<X509Match>,
    pub password: Option<PasswordMatch>,
}

/// A user name and an argon2id password hash (as printed by `rampart passwd`), optionally bound
/// to one client id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordMatch {
    pub username: String,
    pub client_id: Option<String>,
    pub hash: String,
}

/// Which certificate identities a credential covers: one exact identity, or a regex (exact
/// matches win; among regexes the highest priority, then the first listed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509Match {
    pub identity: Option<String>,
    pub identity_regex: Option<String>,
    #[serde(default)]
    pub priority: i32,
    /// Only certificates from this issuer (distinguished name as `O=Rampart, CN=Plant 7 CA`).
    pub issuer: Option<String>,
}

/// DEVICE: many clients with a low rate each, small offline queue. APPLICATION: few high-rate
/// consumers, large queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ClientType {
    #[default]
    Device,
    Application,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One permission. Exactly one of `topic_regex` (matched against the topic, or the filter for a
/// subscription) or `pattern` (an MQTT topic filter) is set; both may use `%u` (user name /
/// identity) and `%c` (client id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub access: Access,
    pub topic_regex: Option<String>,
    pub pattern: Option<String>,
    /// An explicit deny, evaluated before every allow.
    #[serde(default)]
    pub deny: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn allows_read(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    pub fn allows_write(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// What applies to a client with a valid certificate but no credential, and to clients without
/// any certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// `reject` (CONNACK not authorized) or `default_rules` (connect with `rules`).
    #[serde(default)]
    pub unknown_certificate: UnknownCertificate,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub client_type: ClientType,
    /// Whether clients without certificate and password may connect, with `anonymous_rules`.
    #[serde(default)]
    pub anonymous: bool,
    #[serde(default)]
    pub anonymous_rules: Vec<Rule>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            unknown_certificate: UnknownCertificate::Reject,
            rules: Vec::new(),
            client_type: ClientType::Device,
            anonymous: false,
            anonymous_rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownCertificate {
    #[default]
    Reject,
    DefaultRules,
}

/// Certificates that are no longer accepted: every field that is set must match (issuer
/// distinguished name; serial as colon-separated hex; a regex over the whole identity;
/// issued — `notBefore` — before a time). A serial needs its issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// Assigned by the cluster; used to undo a revocation.
    #[serde(default)]
    pub id: u64,
    pub issuer: Option<String>,
    pub serial: Option<String>,
    pub identity_regex: Option<String>,
    /// Seconds since the Unix epoch.
    pub issued_before: Option<i64>,
    #[serde(default)]
    pub reason: String,
    /// When and by whom (admin identity) it was made; set by the cluster.
    #[serde(default)]
    pub revoked_at: i64,
    #[serde(default)]
    pub revoked_by: String,
    /// `api`, `crl` (an entry of an imported CRL) or empty (the state file).
    #[serde(default)]
    pub source: String,
}
