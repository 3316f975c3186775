//! `AuthIndex`: the `AuthState` compiled for the hot path — credentials by exact identity and by
//! regex, roles by name, the revocation set — and the CONNECT-time decision built on it.

use std::collections::HashMap;
use std::sync::Arc;

use mqttbytes::v5::ConnectReturnCode;
use regex::Regex;

use super::acl::{self, Acl};
use super::identity::PeerCertificate;
use super::jwt::{JwtVerifier, VerifiedToken};
use super::password;
use super::policy::{PasswordKey, Principal, Verified};
use super::scram;
use super::state::{AuthState, ClientType, Credential, ProviderKind, Providers, Revocation, Rule, UnknownCertificate};
use crate::auth::Refusal;

/// What a client was granted at CONNECT.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Where the permissions came from.
    pub source: GrantSource,
    pub client_type: ClientType,
    pub acl: Acl,
    /// Offline queue limit set for the client type in the state, if any.
    pub max_queued_messages: Option<usize>,
    /// When the client's token expires, if it authenticated with one and the `jwt` provider
    /// disconnects at expiry (seconds since the epoch).
    pub expires_at: Option<i64>,
}

/// Where a grant's permissions came from, as `rampart admin check-access` explains a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantSource {
    /// A credential of the state: its own rules and its roles' (x509, basic and scram clients).
    Credential(String),
    /// A token's own rules claim.
    TokenClaims { subject: String },
    /// The `jwt` provider's rules, for a token without a rules claim.
    JwtProviderRules { subject: String },
    /// The rules in the HTTP endpoint's answer.
    HttpAnswer { principal: String },
    /// The `http` provider's rules, for an answer without rules.
    HttpProviderRules { principal: String },
    /// The default rules, for a certificate without a credential (`unknown_certificate = "default_rules"`).
    UnknownCertificateDefaults,
    /// The anonymous rules, for a client that presented nothing.
    AnonymousRules,
    /// No authorization state at all: everything is allowed.
    Unrestricted,
}

impl GrantSource {
    /// The matched credential's name, if a credential decided.
    pub fn credential(&self) -> Option<&str> {
        match self {
            GrantSource::Credential(name) => Some(name),
            _ => None,
        }
    }
}

impl std::fmt::Display for GrantSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrantSource::Credential(name) => write!(f, "credential {name:?}"),
            GrantSource::TokenClaims { subject } => write!(f, "token of {subject:?}, rules from its claims"),
            GrantSource::JwtProviderRules { subject } => write!(f, "token of {subject:?}, the jwt provider's rules"),
            GrantSource::HttpAnswer { principal } => write!(f, "http endpoint's answer for {principal:?}"),
            GrantSource::HttpProviderRules { principal } => write!(f, "http endpoint allowed {principal:?}, the http provider's rules"),
            GrantSource::UnknownCertificateDefaults => write!(f, "default rules for a certificate without a credential"),
            GrantSource::AnonymousRules => write!(f, "anonymous rules"),
            GrantSource::Unrestricted => write!(f, "no authorization state: everything allowed"),
        }
    }
}

/// How the `basic` provider treats the password: verify it (the broker), or take it as right
/// or wrong (`rampart admin check-access`, which knows no password).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Verify,
    Assume(bool),
}

#[derive(Debug, Default)]
pub struct AuthIndex {
    /// `None` when no authorization is configured: every authenticated client may do anything.
    state: Option<AuthState>,
    roles: HashMap<String, usize>,
    /// Serial revocations by (issuer, serial) → revocation index.
    revoked_serials: HashMap<(String, String), usize>,
    /// The other revocations: (identity regex, revocation index).
    revocation_rules: Vec<(Option<Regex>, usize)>,
    /// The `jwt` provider, when enabled.
    jwt: Option<Arc<JwtVerifier>>,
}

impl AuthIndex {
    /// No authorization configured.
    pub fn open() -> AuthIndex {
        AuthIndex::default()
    }

    /// Compiles and checks a state: unique names, one identity form per credential, regexes that
    /// compile, roles that exist, rules that are valid.
    pub fn build(state: AuthState) -> Result<AuthIndex, String> {
        AuthIndex::compile(state, true)
    }

    /// Compiles a replicated state, whose parts were each checked when they were changed. The
    /// credentials come with their lookups (a [`CredentialList`](super::credentials::CredentialList)
    /// shared with the state), so this costs nothing per credential.
    pub fn rebuild(state: AuthState) -> Result<AuthIndex, String> {
        AuthIndex::compile(state, false)
    }

    fn compile(state: AuthState, validate: bool) -> Result<AuthIndex, String> {
        let mut index = AuthIndex::default();
        for (i, role) in state.roles.iter().enumerate() {
            if index.roles.insert(role.name.clone(), i).is_some() {
                return Err(format!("roles: duplicate role {:?}", role.name));
            }
            check_rules(&role.rules).map_err(|e| format!("roles.{}: {e}", role.name))?;
        }
        if validate {
            for c in state.credentials.iter() {
                validate_credential(c, |role| index.roles.contains_key(role)).map_err(|e| format!("credentials.{}: {e}", c.name))?;
            }
        }
        check_rules(&state.defaults.rules).map_err(|e| format!("defaults: {e}"))?;
        check_rules(&state.defaults.anonymous_rules).map_err(|e| format!("defaults.anonymous_rules: {e}"))?;
        for (i, revocation) in state.revocations.iter().enumerate() {
            let regex = compile_revocation(revocation).map_err(|e| format!("revocations[{i}]: {e}"))?;
            match (&revocation.issuer, &revocation.serial) {
                (Some(issuer), Some(serial)) if regex.is_none() && revocation.issued_before.is_none() => {
                    let serial = crate::auth::serial::normalize_serial(serial).map_err(|e| format!("revocations[{i}]: {e}"))?;
                    index.revoked_serials.insert((issuer.clone(), serial), i);
                }
                _ => index.revocation_rules.push((regex, i)),
            }
        }
        index.jwt = compile_providers(&state.providers)?;
        index.state = Some(state);
        Ok(index)
    }

    /// The enabled providers in the order they are tried.
    pub fn provider_order(&self) -> &[ProviderKind] {
        static DEFAULT: std::sync::LazyLock<Providers> = std::sync::LazyLock::new(Providers::default);
        &self.state.as_ref().map_or(&*DEFAULT, |s| &s.providers).order
    }

    /// The `scram` provider's stored verifier of a user name for a mechanism, if any.
    pub fn scram_verifier(&self, username: &str, mechanism: scram::Mechanism) -> Option<scram::Verifier> {
        let state = self.state.as_ref()?;
        let p = state.credentials.by_username(username)?.password.as_ref()?;
        let text = match mechanism {
            scram::Mechanism::Sha256 => p.scram_sha256.as_ref(),
            scram::Mechanism::Sha512 => p.scram_sha512.as_ref(),
        }?;
        scram::Verifier::parse(text).ok()
    }

    /// The `http` provider's settings, when it is enabled.
    pub fn http_settings(&self) -> Option<&super::state::HttpSettings> {
        let settings = self.state.as_ref()?.providers.http.as_ref();
        settings.filter(|_| self.provider_order().contains(&ProviderKind::Http))
    }

    /// The `jwt` provider: verifies a token from the CONNECT password field (see [`JwtVerifier::verify`]).
    pub fn verify_token(&self, token: &str, client_id: &str, username: Option<&str>, now: Option<i64>) -> Result<VerifiedToken, Refusal> {
        let jwt = self
            .jwt
            .as_ref()
            .ok_or_else(|| Refusal { code: ConnectReturnCode::NotAuthorized, reason: "the jwt provider is disabled".into() })?;
        jwt.verify(token, client_id, username, now)
    }

    /// The revocation that covers a certificate, if any.
    pub fn revocation_of(&self, cert: &PeerCertificate) -> Option<&Revocation> {
        let state = self.state.as_ref()?;
        if let Some(&i) = self.revoked_serials.get(&(cert.issuer.clone(), cert.serial.clone())) {
            return Some(&state.revocations[i]);
        }
        self.revocation_rules.iter().map(|(regex, i)| (regex, &state.revocations[*i])).find_map(|(regex, r)| {
            let covered = r.issuer.as_ref().is_none_or(|issuer| *issuer == cert.issuer)
                && r.serial.as_ref().is_none_or(|serial| crate::auth::serial::normalize_serial(serial).is_ok_and(|s| s == cert.serial))
                && regex.as_ref().is_none_or(|regex| regex.is_match(&cert.identity))
                && r.issued_before.is_none_or(|before| cert.not_before < before);
            covered.then_some(r)
        })
    }

    /// The state this index was built from (`None`: no authorization configured).
    pub fn state(&self) -> Option<&AuthState> {
        self.state.as_ref()
    }

    fn credential<'a>(state: &'a AuthState, identity: &'a str, issuer: &str) -> Option<&'a Credential> {
        let c = &state.credentials;
        let issuer_ok = |c: &&Credential| c.x509.as_ref().and_then(|x| x.issuer.as_deref()).is_none_or(|i| i == issuer);
        c.by_identity(identity).filter(issuer_ok).or_else(|| c.regex_matches(identity).find(issuer_ok))
    }

    /// The `basic` provider: checks a password against the password credentials — the one of
    /// the user name, else the one bound to the client id alone. `Ok(None)`: not for this
    /// provider (no authorization configured, or neither a user name nor a credential for the
    /// client id). Slow by design (argon2id): call it off the async threads.
    pub fn check_password(
        &self,
        username: Option<&str>,
        client_id: &str,
        password: Option<&str>,
        check: PasswordCheck,
    ) -> Result<Option<PasswordKey>, Refusal> {
        let Some(state) = &self.state else { return Ok(None) };
        // An MQTT 5 CONNECT may carry a password without a user name (decoded as empty).
        let username = username.filter(|u| !u.is_empty());
        let c = &state.credentials;
        let (key, at) = match (username.and_then(|u| c.by_username(u).map(|c| (u, c))), c.by_client_id(client_id)) {
            (Some((u, c)), _) => (PasswordKey::Username(u.to_string()), Some(c)),
            (None, Some(c)) => (PasswordKey::ClientId(client_id.to_string()), Some(c)),
            (None, None) => match username {
                Some(u) => (PasswordKey::Username(u.to_string()), None),
                None => return Ok(None),
            },
        };
        let hash = at.and_then(|c| c.password.as_ref()).map(|p| p.hash.as_str()).filter(|h| !h.is_empty());
        let right = match check {
            // Without a credential, verify against a fixed hash anyway, so timing does not tell which user names exist.
            PasswordCheck::Verify => password::verify(password.unwrap_or_default(), hash.unwrap_or(&TIMING_HASH)),
            PasswordCheck::Assume(right) => right,
        };
        if !(right && hash.is_some()) {
            let who = match &key {
                PasswordKey::Username(u) => format!("user name {u:?}"),
                PasswordKey::ClientId(id) => format!("client id {id:?}"),
            };
            return Err(Refusal { code: ConnectReturnCode::BadUserNamePassword, reason: format!("unknown {who} or wrong password") });
        }
        Ok(Some(key))
    }

    /// The CONNECT decision for an authenticated principal, revocations aside: those are
    /// [`crate::auth::store::AuthStore::authorize`]'s, which also knows the CRL files.
    pub fn authorize(&self, principal: &Principal, client_id: &str) -> Result<Grant, Refusal> {
        let refuse = |reason: String| Refusal { code: ConnectReturnCode::NotAuthorized, reason };
        let Some(cert) = &principal.certificate else {
            let Some(state) = &self.state else {
                return Ok(Grant::allow_all());
            };
            let username = principal.username.as_deref().unwrap_or_default();
            if let Some(Verified::Token(token)) = &principal.verified {
                return self.authorize_token(state, token, client_id);
            }
            if let Some(Verified::Http(grant)) = &principal.verified {
                let settings = state.providers.http.as_ref().filter(|_| self.provider_order().contains(&ProviderKind::Http));
                let settings = settings.ok_or_else(|| refuse("the http provider is disabled".into()))?;
                let rules = grant.rules.as_ref().unwrap_or(&settings.rules);
                let acl = Acl::compile(rules, &grant.principal, client_id).map_err(|e| refuse(format!("permissions: {e}")))?;
                let principal = grant.principal.clone();
                let source = if grant.rules.is_some() {
                    GrantSource::HttpAnswer { principal }
                } else {
                    GrantSource::HttpProviderRules { principal }
                };
                return Ok(self.grant_for(state, source, grant.client_type.unwrap_or(settings.client_type), acl));
            }
            if let Some(Verified::Scram(username)) = &principal.verified {
                let credential = state.credentials.by_username(username);
                let has_scram = |c: &Credential| c.password.as_ref().is_some_and(|p| p.scram_sha256.is_some() || p.scram_sha512.is_some());
                return match credential {
                    _ if !self.provider_order().contains(&ProviderKind::Scram) => Err(refuse("the scram provider is disabled".into())),
                    Some(c) if has_scram(c) => self.authorize_password(state, c, username, client_id),
                    _ => Err(refuse(format!("the SCRAM credential of {username:?} no longer exists"))),
                };
            }
            if let Some(Verified::Password(key)) = &principal.verified {
                let credential = match key {
                    PasswordKey::Username(u) => state.credentials.by_username(u),
                    PasswordKey::ClientId(id) => state.credentials.by_client_id(id).filter(|_| id == client_id),
                };
                return match credential {
                    _ if !self.provider_order().contains(&ProviderKind::Basic) => Err(refuse("the basic provider is disabled".into())),
                    None => Err(refuse(format!("the password credential of {key:?} no longer exists"))),
                    Some(c) => self.authorize_password(state, c, username, client_id),
                };
            }
            if !state.defaults.anonymous {
                return Err(refuse("anonymous clients are not allowed: present a certificate or a user name and password".into()));
            }
            let acl = Acl::compile(&state.defaults.anonymous_rules, "", client_id).map_err(|e| refuse(format!("permissions: {e}")))?;
            return Ok(self.grant_for(state, GrantSource::AnonymousRules, state.defaults.client_type, acl));
        };
        let Some(state) = &self.state else {
            return Ok(Grant::allow_all());
        };
        if !self.provider_order().contains(&ProviderKind::X509) {
            return Err(refuse("the x509 provider is disabled".into()));
        }
        // A certificate client's `%u` is always its identity, whatever user name it sent.
        let username = cert.identity.as_str();
        let compile = |rules: Vec<&Rule>| Acl::compile(rules, username, client_id).map_err(|e| refuse(format!("permissions: {e}")));
        match AuthIndex::credential(state, &cert.identity, &cert.issuer) {
            Some(c) if !c.enabled => Err(refuse(format!("credential {:?} is disabled", c.name))),
            Some(c) => self.grant(state, c, username, client_id),
            None if state.defaults.unknown_certificate == UnknownCertificate::DefaultRules => {
                let acl = compile(state.defaults.rules.iter().collect())?;
                Ok(self.grant_for(state, GrantSource::UnknownCertificateDefaults, state.defaults.client_type, acl))
            }
            None => Err(refuse(format!("no credential for identity {:?}", cert.identity))),
        }
    }
}

impl AuthIndex {
    /// A client whose password credential accepted it (by `basic` or `scram`).
    fn authorize_password(&self, state: &AuthState, c: &Credential, username: &str, client_id: &str) -> Result<Grant, Refusal> {
        let refuse = |reason: String| Refusal { code: ConnectReturnCode::NotAuthorized, reason };
        match c.password.as_ref().and_then(|p| p.client_id.as_deref()) {
            _ if !c.enabled => Err(refuse(format!("credential {:?} is disabled", c.name))),
            Some(bound) if bound != client_id => Err(refuse(format!("credential {:?} is bound to another client id", c.name))),
            _ => self.grant(state, c, username, client_id),
        }
    }

    /// A token client: the token verified again against the keys and settings in force (not its
    /// time: expiry during a session is the connection's timer's business); permissions from its
    /// claims, else the provider's rules.
    fn authorize_token(&self, state: &AuthState, token: &VerifiedToken, client_id: &str) -> Result<Grant, Refusal> {
        let again = self.verify_token(&token.token, client_id, token.username.as_deref(), None)?;
        let settings = self.jwt.as_ref().map(|j| j.settings()).expect("verified above");
        let rules = again.rules.as_ref().unwrap_or(&settings.rules);
        let acl = Acl::compile(rules, &again.subject, client_id)
            .map_err(|e| Refusal { code: ConnectReturnCode::NotAuthorized, reason: format!("permissions: {e}") })?;
        let subject = again.subject.clone();
        let source = if again.rules.is_some() { GrantSource::TokenClaims { subject } } else { GrantSource::JwtProviderRules { subject } };
        let mut grant = self.grant_for(state, source, again.client_type.unwrap_or(settings.client_type), acl);
        grant.expires_at = settings.disconnect_at_expiry.then_some(token.expires_at);
        Ok(grant)
    }

    /// The permissions of a matched credential: its own rules and those of its roles.
    fn grant(&self, state: &AuthState, c: &Credential, username: &str, client_id: &str) -> Result<Grant, Refusal> {
        let role_rules = c.roles.iter().flat_map(|r| state.roles[self.roles[r]].rules.iter());
        let acl = Acl::compile(c.rules.iter().chain(role_rules), username, client_id)
            .map_err(|e| Refusal { code: ConnectReturnCode::NotAuthorized, reason: format!("permissions: {e}") })?;
        Ok(self.grant_for(state, GrantSource::Credential(c.name.clone()), c.client_type, acl))
    }

    fn grant_for(&self, state: &AuthState, source: GrantSource, client_type: ClientType, acl: Acl) -> Grant {
        Grant { source, client_type, acl, max_queued_messages: state.client_types.of(client_type).max_queued_messages, expires_at: None }
    }
}

impl Grant {
    /// No authorization configured: any authenticated client may do anything.
    fn allow_all() -> Grant {
        Grant {
            source: GrantSource::Unrestricted,
            client_type: ClientType::Device,
            acl: Acl::allow_all(),
            max_queued_messages: None,
            expires_at: None,
        }
    }
}

/// Checks one credential on its own (its uniqueness is the caller's business): exactly one
/// identity form, valid rules, known roles, a usable hash. Returns its compiled identity regex.
pub fn validate_credential(c: &Credential, role_exists: impl Fn(&str) -> bool) -> Result<Option<Regex>, String> {
    if c.name.is_empty() {
        return Err("name: must not be empty".into());
    }
    check_rules(&c.rules)?;
    if let Some(role) = c.roles.iter().find(|r| !role_exists(r)) {
        return Err(format!("unknown role {role:?}"));
    }
    match (&c.x509, &c.password) {
        (Some(x509), None) => match (&x509.identity, &x509.identity_regex) {
            (Some(identity), None) if identity.is_empty() => Err("x509.identity: must not be empty".into()),
            (Some(_), None) => Ok(None),
            (None, Some(pattern)) => Regex::new(&format!("^(?:{pattern})$")).map(Some).map_err(|e| format!("identity_regex: {e}")),
            _ => Err("x509 needs exactly one of identity and identity_regex".into()),
        },
        (None, Some(pw)) if pw.username.as_ref().is_some_and(String::is_empty) => Err("password.username: must not be empty".into()),
        (None, Some(pw)) if pw.client_id.as_ref().is_some_and(String::is_empty) => Err("password.client_id: must not be empty".into()),
        (None, Some(pw)) if pw.username.is_none() && pw.client_id.is_none() => Err("password needs a username, a client_id or both".into()),
        (None, Some(pw)) => {
            let scram = [
                (&pw.scram_sha256, scram::Mechanism::Sha256, "scram_sha256"),
                (&pw.scram_sha512, scram::Mechanism::Sha512, "scram_sha512"),
            ];
            for (text, mechanism, key) in scram {
                let Some(text) = text else { continue };
                let verifier = scram::Verifier::parse(text).map_err(|e| format!("password.{key}: {e}"))?;
                if verifier.mechanism != mechanism {
                    return Err(format!("password.{key}: holds a {} verifier", verifier.mechanism.name()));
                }
                if pw.username.is_none() {
                    return Err(format!("password.{key}: SCRAM needs a username"));
                }
            }
            match (pw.hash.is_empty(), pw.scram_sha256.is_some() || pw.scram_sha512.is_some()) {
                (true, false) => Err("password needs a hash, a scram_sha256 or a scram_sha512 verifier".into()),
                (true, true) => Ok(None),
                (false, _) => password::check_hash(&pw.hash).map(|_| None).map_err(|e| format!("password.hash: {e}")),
            }
        }
        _ => Err("a credential needs exactly one of x509 and password".into()),
    }
}

/// Checks the provider chain (each provider at most once; settings for `jwt` when enabled) and
/// compiles the `jwt` provider.
pub fn compile_providers(p: &Providers) -> Result<Option<Arc<JwtVerifier>>, String> {
    for (i, kind) in p.order.iter().enumerate() {
        if p.order[..i].contains(kind) {
            return Err(format!("providers.order: {kind} is listed twice"));
        }
    }
    match (&p.http, p.order.contains(&ProviderKind::Http)) {
        (None, true) => return Err("providers.http: required when http is in providers.order".into()),
        (Some(h), _) => {
            let uri: hyper::Uri = h.url.parse().map_err(|e| format!("providers.http.url: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err("providers.http.url: must be http://host/… or https://host/…".into());
            }
            if h.timeout_ms == 0 {
                return Err("providers.http.timeout_ms: must be at least 1".into());
            }
            check_rules(&h.rules).map_err(|e| format!("providers.http.rules: {e}"))?;
        }
        (None, false) => {}
    }
    match (&p.jwt, p.order.contains(&ProviderKind::Jwt)) {
        (None, true) => Err("providers.jwt: required when jwt is in providers.order".into()),
        (Some(settings), true) => JwtVerifier::new(settings).map(|v| Some(Arc::new(v))),
        (Some(settings), false) => JwtVerifier::new(settings).map(|_| None),
        (None, false) => Ok(None),
    }
}

/// Checks rules (valid patterns and regexes).
pub fn check_rules(rules: &[Rule]) -> Result<(), String> {
    rules.iter().try_for_each(acl::validate_rule)
}

/// Checks a revocation and compiles its identity regex.
pub fn compile_revocation(r: &Revocation) -> Result<Option<Regex>, String> {
    if r.issuer.is_none() && r.serial.is_none() && r.identity_regex.is_none() && r.issued_before.is_none() {
        return Err("a revocation needs at least one of issuer, serial, identity_regex and issued_before".into());
    }
    if let Some(serial) = &r.serial {
        if r.issuer.is_none() {
            return Err("serial: a serial is only unique per issuer; give the issuer too".into());
        }
        crate::auth::serial::normalize_serial(serial).map_err(|e| format!("serial: {e}"))?;
    }
    r.identity_regex.as_ref().map(|p| Regex::new(&format!("^(?:{p})$")).map_err(|e| format!("identity_regex: {e}"))).transpose()
}

/// An argon2id hash verified against when a user name is unknown.
static TIMING_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| password::hash("no such user").unwrap_or_default());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::PeerCertificate;

    const STATE: &str = r#"
        [[roles]]
        name = "telemetry"
        rules = [{ access = "write", pattern = "cpi/%u/telemetry" }]

        [[credentials]]
        name = "plc-1"
        roles = ["telemetry"]
        x509 = { identity = "plc-1" }
        rules = [{ access = "read", pattern = "cpi/%u/commands" }]

        [[credentials]]
        name = "all-sensors"
        client_type = "APPLICATION"
        x509 = { identity_regex = "sensor-[0-9]+", priority = 1 }
        rules = [{ access = "readWrite", topic_regex = "sensors/%u/.*" }]

        [[credentials]]
        name = "retired"
        enabled = false
        x509 = { identity = "plc-9" }

        [[credentials]]
        name = "other-ca-only"
        x509 = { identity = "gw-1", issuer = "CN=Other CA" }

        [defaults]
        unknown_certificate = "reject"

        [[revocations]]
        issuer = "CN=Fleet CA"
        serial = "0A:0B"
    "#;

    fn index(text: &str) -> AuthIndex {
        AuthIndex::build(toml::from_str(text).unwrap()).unwrap()
    }

    fn principal(identity: &str, serial: &str) -> Principal {
        let cert =
            PeerCertificate { identity: identity.into(), serial: serial.into(), issuer: "CN=Fleet CA".into(), not_before: 0, not_after: 0 };
        Principal { identity: Some(identity.into()), username: Some(identity.into()), certificate: Some(cert), verified: None }
    }

    #[test]
    fn credentials_roles_and_rules() {
        let index = index(STATE);
        let grant = index.authorize(&principal("plc-1", "01"), "plc-1").unwrap();
        assert_eq!(grant.source.credential(), Some("plc-1"));
        assert!(grant.acl.may_publish("cpi/plc-1/telemetry"), "from the role");
        assert!(grant.acl.may_subscribe("cpi/plc-1/commands"), "from the credential");
        assert!(!grant.acl.may_publish("cpi/plc-2/telemetry"));
        let sensor = index.authorize(&principal("sensor-42", "02"), "sensor-42").unwrap();
        assert_eq!(sensor.client_type, ClientType::Application);
        assert!(sensor.acl.may_publish("sensors/sensor-42/temp"));
    }

    #[test]
    fn a_rebuild_takes_the_credentials_and_revocations_of_its_state() {
        let first = index(STATE);
        let mut state = first.state().unwrap().clone();
        state.revocations.clear();
        let second = AuthIndex::rebuild(state.clone()).unwrap();
        let revoked = principal("plc-1", "0A:0B").certificate.unwrap();
        assert!(first.revocation_of(&revoked).is_some());
        assert!(second.revocation_of(&revoked).is_none(), "no longer revoked");
        assert!(state.credentials.remove("plc-1").is_some());
        let third = AuthIndex::rebuild(state).unwrap();
        assert!(second.authorize(&principal("plc-1", "01"), "plc-1").is_ok());
        assert!(third.authorize(&principal("plc-1", "01"), "plc-1").is_err(), "deleted");
    }

    #[test]
    fn refusals() {
        let index = index(STATE);
        for (identity, serial, why) in [("plc-9", "03", "disabled"), ("stranger", "04", "no credential"), ("gw-1", "05", "no credential")] {
            let err = index.authorize(&principal(identity, serial), identity).unwrap_err();
            assert_eq!(err.code, ConnectReturnCode::NotAuthorized);
            assert!(err.reason.contains(why), "{identity}: {}", err.reason);
        }
    }

    #[test]
    fn default_rules_for_unknown_certificates() {
        let index = index(
            r#"
            [defaults]
            unknown_certificate = "default_rules"
            rules = [{ access = "readWrite", pattern = "devices/%u/#" }]
            "#,
        );
        let grant = index.authorize(&principal("device-7", "01"), "device-7").unwrap();
        assert!(grant.acl.may_publish("devices/device-7/x"));
        assert!(!grant.acl.may_publish("devices/device-8/x"));
    }

    #[test]
    fn no_state_allows_everything_but_anonymous_is_allowed_too() {
        let grant = AuthIndex::open().authorize(&principal("x", "01"), "x").unwrap();
        assert!(grant.acl.may_subscribe("#"));
    }

    fn password_state() -> AuthIndex {
        let hash = password::hash("s3cret").unwrap();
        index(&format!(
            r#"
            [[credentials]]
            name = "dashboard"
            client_type = "APPLICATION"
            password = {{ username = "dashboard", hash = "{hash}" }}
            rules = [{{ access = "read", pattern = "devices/#" }}]

            [[credentials]]
            name = "bound"
            password = {{ username = "bound", client_id = "bound-1", hash = "{hash}" }}

            [[credentials]]
            name = "kiosk"
            password = {{ client_id = "kiosk-1", hash = "{hash}" }}
            rules = [{{ access = "write", pattern = "kiosk/%c" }}]

            [[credentials]]
            name = "plc-1"
            x509 = {{ identity = "plc-1" }}
            "#
        ))
    }

    fn password_principal(username: &str) -> Principal {
        let verified = Some(Verified::Password(PasswordKey::Username(username.into())));
        Principal { identity: None, username: Some(username.into()), certificate: None, verified }
    }

    #[test]
    fn password_credentials() {
        let index = password_state();
        let check =
            |user: Option<&str>, client_id: &str, pw: Option<&str>| index.check_password(user, client_id, pw, PasswordCheck::Verify);
        assert_eq!(check(Some("dashboard"), "x", Some("s3cret")), Ok(Some(PasswordKey::Username("dashboard".into()))));
        let grant = index.authorize(&password_principal("dashboard"), "any-id").unwrap();
        assert_eq!(grant.client_type, ClientType::Application);
        assert!(grant.acl.may_subscribe("devices/#"));
        for (user, pw) in [("dashboard", Some("wrong")), ("dashboard", None), ("nobody", Some("s3cret")), ("plc-1", Some("s3cret"))] {
            let err = check(Some(user), "x", pw).unwrap_err();
            assert_eq!(err.code, ConnectReturnCode::BadUserNamePassword, "{user}");
        }
        assert_eq!(check(None, "x", Some("s3cret")), Ok(None), "no user name, no client id credential: not for basic");
        // A credential bound to a client id only.
        assert_eq!(check(None, "kiosk-1", Some("s3cret")), Ok(Some(PasswordKey::ClientId("kiosk-1".into()))));
        assert_eq!(check(Some("anyone"), "kiosk-1", Some("s3cret")), Ok(Some(PasswordKey::ClientId("kiosk-1".into()))));
        assert_eq!(check(None, "kiosk-1", Some("wrong")).unwrap_err().code, ConnectReturnCode::BadUserNamePassword);
        let kiosk = Principal { verified: Some(Verified::Password(PasswordKey::ClientId("kiosk-1".into()))), ..Principal::default() };
        assert_eq!(kiosk.owner(), crate::auth::policy::Owner::PasswordClientId { client_id: "kiosk-1".into() });
        assert!(index.authorize(&kiosk, "kiosk-1").unwrap().acl.may_publish("kiosk/kiosk-1"));
        assert!(index.authorize(&kiosk, "kiosk-2").is_err(), "bound to its client id");
        assert_eq!(
            index.check_password(Some("nobody"), "x", None, PasswordCheck::Assume(true)).unwrap_err().code,
            ConnectReturnCode::BadUserNamePassword
        );
        assert!(index.check_password(Some("dashboard"), "x", None, PasswordCheck::Assume(true)).is_ok());
        assert!(index.authorize(&password_principal("bound"), "bound-1").is_ok());
        assert_eq!(index.authorize(&password_principal("bound"), "other").unwrap_err().code, ConnectReturnCode::NotAuthorized);
    }

    #[test]
    fn scram_verifiers_are_found_by_user_name_and_mechanism() {
        let v256 = scram::Verifier::generate(scram::Mechanism::Sha256, "pw", 4096).unwrap();
        let text = format!(
            "[providers]\norder = [\"scram\"]\n[[credentials]]\nname = \"app\"\npassword = {{ username = \"app\", scram_sha256 = \"{v256}\" }}\n\
             [[credentials]]\nname = \"b\"\npassword = {{ client_id = \"b\", scram_sha256 = \"{v256}\" }}\n"
        );
        assert!(AuthIndex::build(toml::from_str(&text).unwrap()).unwrap_err().contains("SCRAM needs a username"));
        let index = index(&text[..text.find("[[credentials]]\nname = \"b\"").unwrap()]);
        assert_eq!(index.scram_verifier("app", scram::Mechanism::Sha256), Some(v256));
        assert_eq!(index.scram_verifier("app", scram::Mechanism::Sha512), None);
        let principal = Principal { username: Some("app".into()), verified: Some(Verified::Scram("app".into())), ..Principal::default() };
        assert_eq!(principal.owner(), crate::auth::policy::Owner::Password { username: "app".into() });
        assert!(index.authorize(&principal, "any").is_ok());
        assert!(index.check_password(Some("app"), "any", Some("pw"), PasswordCheck::Verify).is_err(), "no argon2 hash: basic refuses");
    }

    #[test]
    fn anonymous_clients_follow_the_defaults() {
        let anonymous = Principal::default();
        assert_eq!(password_state().authorize(&anonymous, "x").unwrap_err().code, ConnectReturnCode::NotAuthorized);
        let open = index("[defaults]\nanonymous = true\nanonymous_rules = [{ access = \"readWrite\", pattern = \"demo/#\" }]\n");
        let grant = open.authorize(&anonymous, "x").unwrap();
        assert!(grant.acl.may_publish("demo/a") && !grant.acl.may_publish("devices/a"));
        assert_eq!(AuthIndex::open().check_password(Some("u"), "x", Some("p"), PasswordCheck::Verify), Ok(None));
    }

    #[test]
    fn invalid_states_are_refused_with_the_place() {
        for (text, needle) in [
            ("[[credentials]]\nname = \"a\"\nx509 = {}\n", "exactly one"),
            ("[[credentials]]\nname = \"a\"\n", "exactly one of x509 and password"),
            ("[[credentials]]\nname = \"a\"\npassword = { username = \"a\", hash = \"plain\" }\n", "password.hash"),
            ("[[credentials]]\nname = \"a\"\npassword = { hash = \"plain\" }\n", "a username, a client_id or both"),
            ("[providers]\norder = [\"jwt\"]\n", "providers.jwt: required"),
            ("[[credentials]]\nname = \"a\"\npassword = { username = \"a\", scram_sha256 = \"plain\" }\n", "password.scram_sha256"),
            ("[[credentials]]\nname = \"a\"\npassword = { username = \"a\" }\n", "needs a hash, a scram_sha256"),
            ("[providers]\norder = [\"x509\", \"x509\"]\n", "listed twice"),
            ("[[credentials]]\nname = \"a\"\nroles = [\"nope\"]\nx509 = { identity = \"a\" }\n", "unknown role"),
            ("[[credentials]]\nname = \"a\"\nx509 = { identity_regex = \"(\" }\n", "identity_regex"),
            (
                "[[credentials]]\nname = \"a\"\nx509 = { identity = \"a\" }\nrules = [{ access = \"read\", pattern = \"a/#/b\" }]\n",
                "credentials.a",
            ),
            (
                "[[credentials]]\nname = \"a\"\nx509 = { identity = \"a\" }\n[[credentials]]\nname = \"b\"\nx509 = { identity = \"a\" }\n",
                "credentials.b: identity \"a\" is already used by credential \"a\"",
            ),
            (
                "[[credentials]]\nname = \"a\"\nx509 = { identity = \"a\" }\n[[credentials]]\nname = \"a\"\nx509 = { identity = \"b\" }\n",
                "credentials.a: duplicate credential name",
            ),
        ] {
            // Names and identities are unique as the credential list is read; the rest is the build's.
            let err = toml::from_str::<AuthState>(text).map_err(|e| e.to_string()).and_then(AuthIndex::build).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
