//! `AuthState`: the authentication and authorization data of a fleet, as plain serde data —
//! credentials, roles, default rules, client-type settings and revocations. A standalone node
//! reads it from a TOML file; a cluster replicates it through Raft (see `cluster::command`).

use serde::{Deserialize, Serialize};

pub use super::credentials::CredentialList;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthState {
    /// Persistent, with its lookups: shared with the compiled index, and a change costs what
    /// it changes (see [`CredentialList`]).
    #[serde(default)]
    pub credentials: CredentialList,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub revocations: Vec<Revocation>,
    #[serde(default)]
    pub client_types: ClientTypes,
    /// Which authentication providers are enabled, in which order, and their settings.
    #[serde(default)]
    pub providers: Providers,
}

/// An authentication provider: what proves who a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The verified client certificate (mutual TLS).
    X509,
    /// A password credential, matched by user name, client id or both.
    Basic,
    /// A JSON Web Token in the CONNECT password field.
    Jwt,
    /// SCRAM-SHA-256/512 through MQTT 5 enhanced authentication (AUTH), against the SCRAM
    /// verifiers of password credentials.
    Scram,
    /// The decision of the operator's HTTP(S) endpoint.
    Http,
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::X509 => "x509",
            ProviderKind::Basic => "basic",
            ProviderKind::Jwt => "jwt",
            ProviderKind::Scram => "scram",
            ProviderKind::Http => "http",
        })
    }
}

fn default_order() -> Vec<ProviderKind> {
    vec![ProviderKind::X509, ProviderKind::Basic]
}

/// The provider chain: the enabled providers in the order they are tried (a provider not
/// listed is disabled); the first that authenticates the client wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Providers {
    #[serde(default = "default_order")]
    pub order: Vec<ProviderKind>,
    /// Settings of the `jwt` provider; required when it is enabled.
    pub jwt: Option<JwtSettings>,
    /// Settings of the `http` provider; required when it is enabled.
    pub http: Option<HttpSettings>,
}

/// What `rampart admin providers get` shows instead of a secret; given back to `providers set`,
/// it keeps the secret in force.
pub const REDACTED: &str = "******";

impl Providers {
    /// A copy fit to show an admin: the JWT HMAC secret replaced by [`REDACTED`].
    pub fn redacted(&self) -> Providers {
        let mut shown = self.clone();
        if let Some(secret) = shown.jwt.as_mut().and_then(|jwt| jwt.hmac_secret.as_mut()) {
            *secret = REDACTED.into();
        }
        shown
    }

    /// `self`, with a [`REDACTED`] secret replaced by the one `current` holds.
    pub fn keeping_secrets_of(mut self, current: &Providers) -> Result<Providers, String> {
        if let Some(secret) = self.jwt.as_mut().and_then(|jwt| jwt.hmac_secret.as_mut()).filter(|s| *s == REDACTED) {
            let kept = current.jwt.as_ref().and_then(|jwt| jwt.hmac_secret.clone());
            *secret = kept.ok_or(format!("providers.jwt.hmac_secret: {REDACTED} keeps the secret in force, but there is none"))?;
        }
        Ok(self)
    }
}

impl Default for Providers {
    fn default() -> Self {
        Providers { order: default_order(), jwt: None, http: None }
    }
}

/// Where and how CONNECT decisions are delegated (each node also limits the hosts it calls:
/// `[auth.http] allowed_hosts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `http://host[:port]/path` or `https://…`; the broker POSTs JSON there.
    pub url: String,
    /// Longest wait for an answer.
    #[serde(default = "default_http_timeout")]
    pub timeout_ms: u64,
    /// How long an answer (allow or deny) is reused for the same request; 0: never.
    #[serde(default = "default_http_cache_ttl")]
    pub cache_ttl_secs: u64,
    /// Most answers kept; the oldest go first.
    #[serde(default = "default_http_cache_entries")]
    pub cache_max_entries: usize,
    /// What an unavailable endpoint (down, slow, error status, unreadable answer) means.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Client type when the answer names none.
    #[serde(default)]
    pub client_type: ClientType,
    /// Rules when the answer carries none.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

fn default_http_timeout() -> u64 {
    2000
}

fn default_http_cache_ttl() -> u64 {
    60
}

fn default_http_cache_entries() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Refuse the client (CONNACK server unavailable).
    #[default]
    Deny,
    /// Go on with the next provider, as if `http` were not in the chain.
    Next,
}

/// How JSON Web Tokens are verified and what they grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// Shared secret for HS256/HS384/HS512 tokens (UTF-8 bytes as written).
    pub hmac_secret: Option<String>,
    /// PEM public keys (RSA, EC P-256/P-384 or Ed25519) for RS*/PS*, ES256/ES384 and EdDSA tokens.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// A JWKS document (JSON); a token naming a `kid` is checked only against that key.
    pub jwks: Option<String>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), if set.
    pub audience: Option<String>,
    /// Tolerated clock difference for `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// A claim whose (string) value must equal the client id, if set.
    pub client_id_claim: Option<String>,
    /// A claim whose (string) value must equal the CONNECT user name, if set.
    pub username_claim: Option<String>,
    /// A claim holding `DEVICE` or `APPLICATION`; absent: `client_type`.
    #[serde(default = "default_client_type_claim")]
    pub client_type_claim: String,
    /// A claim holding a list of topic filters the client may publish to.
    #[serde(default = "default_publish_claim")]
    pub publish_claim: String,
    /// A claim holding a list of topic filters the client may read (subscribe to).
    #[serde(default = "default_subscribe_claim")]
    pub subscribe_claim: String,
    /// Client type when the token has no client type claim.
    #[serde(default)]
    pub client_type: ClientType,
    /// Rules when the token has neither a publish nor a subscribe claim.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Close the connection when the token expires (MQTT 5 DISCONNECT 0xA0).
    #[serde(default)]
    pub disconnect_at_expiry: bool,
}

fn default_leeway() -> u64 {
    60
}

fn default_client_type_claim() -> String {
    "client_type".into()
}

fn default_publish_claim() -> String {
    "mqtt_pub".into()
}

fn default_subscribe_claim() -> String {
    "mqtt_sub".into()
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

/// A password credential for a user name, a client id, or both (then both must match): an
/// argon2id hash (as printed by `rampart passwd`) for the `basic` provider, and/or SCRAM
/// verifiers (`rampart passwd --scram sha-256`) for the `scram` provider, which needs a user name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordMatch {
    pub username: Option<String>,
    pub client_id: Option<String>,
    /// Empty: no password for `basic`.
    #[serde(default)]
    pub hash: String,
    pub scram_sha256: Option<String>,
    pub scram_sha512: Option<String>,
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
