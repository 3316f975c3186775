//! `AuthState`: the authentication and authorization data of a fleet, as plain serde data —
//! credentials, roles, default rules, client types and revocations. Read from a TOML file now;
//! the same structure is what the cluster will replicate.

use serde::{Deserialize, Serialize};

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthState {
    #[serde(default)]
    pub credentials: Vec<Credential>,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub revocations: Vec<Revocation>,
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

/// A revoked certificate: issuer distinguished name and serial (colon-separated hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub issuer: String,
    pub serial: String,
    #[serde(default)]
    pub reason: String,
}
