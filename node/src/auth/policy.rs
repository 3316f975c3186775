//! The CONNECT policy: a certificate identity becomes the user name, and client ids belong to
//! names — a principal with a name (certificate identity, password user name, token subject,
//! HTTP principal) may use only the client ids the policy binds to that name, and always wins
//! such an id from a session another principal left there. Pure.

use mqttbytes::v5::ConnectReturnCode;
use serde::{Deserialize, Serialize};

use super::identity::PeerCertificate;
use super::jwt::VerifiedToken;
use super::Refusal;

/// Which client ids belong to a principal's name (certificate identity, password user name,
/// token subject, HTTP principal); a named principal may use only those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdPolicy {
    /// Any client id.
    Any,
    /// The client id must equal the name.
    MustEqualIdentity,
    /// The client id must be the name, or the name followed by the separator and a suffix
    /// (`device-1` and `device-1-telemetry`, never `device-10`): a device may hold several
    /// connections.
    #[default]
    Prefix,
}

impl std::fmt::Display for ClientIdPolicy {
    /// The spelling of the config file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientIdPolicy::Any => "any",
            ClientIdPolicy::MustEqualIdentity => "must_equal_identity",
            ClientIdPolicy::Prefix => "prefix",
        })
    }
}

/// What to do when CONNECT carries a user name other than the certificate identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsernameMismatch {
    /// Replace it with the identity.
    #[default]
    Ignore,
    /// Refuse the connection (not authorized).
    Refuse,
}

/// Reaction to an unauthorized PUBLISH from an MQTT 3.1.1 client, which has no reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnauthorizedPublish {
    /// Close the connection.
    #[default]
    Disconnect,
    /// Acknowledge and drop the message (counted).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthPolicy {
    pub use_identity_as_username: bool,
    pub username_mismatch: UsernameMismatch,
    pub client_id_policy: ClientIdPolicy,
    /// What separates the name from the suffix under the `prefix` policy.
    pub client_id_separator: char,
}

impl AuthPolicy {
    /// Whether the policy binds `client_id` to the principal named `name`.
    pub fn binds(&self, name: &str, client_id: &str) -> bool {
        match self.client_id_policy {
            ClientIdPolicy::Any => false,
            ClientIdPolicy::MustEqualIdentity => client_id == name,
            ClientIdPolicy::Prefix => {
                client_id.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with(self.client_id_separator))
            }
        }
    }

    /// Whether a client of `requester` takes `client_id` from a session of `holder` (another
    /// principal): the policy binds the id to the requester and not to the holder.
    pub fn supersedes(&self, requester: &Owner, holder: &Owner, client_id: &str) -> bool {
        let bound = |owner: &Owner| owner.name().is_some_and(|name| self.binds(name, client_id));
        bound(requester) && !bound(holder)
    }

    /// Puts the client id of a CONNECT from the principal named `name` in its namespace: an
    /// assigned (generated) id is prefixed with the name, or becomes the name; a chosen id the
    /// policy does not bind to the name is refused.
    pub fn bind_client_id(&self, name: &str, claim: &mut ClaimedIdentity<'_>) -> Result<(), Refusal> {
        if claim.assigned_client_id {
            *claim.client_id = match self.client_id_policy {
                ClientIdPolicy::MustEqualIdentity => name.to_string(),
                ClientIdPolicy::Prefix => format!("{name}{}{}", self.client_id_separator, claim.client_id),
                ClientIdPolicy::Any => std::mem::take(claim.client_id),
            };
        }
        if self.client_id_policy == ClientIdPolicy::Any || self.binds(name, claim.client_id) {
            return Ok(());
        }
        Err(not_authorized(format!(
            "client id {:?} is not allowed for identity {name:?} (client_id_policy {})",
            *claim.client_id, self.client_id_policy
        )))
    }
}

impl Default for AuthPolicy {
    fn default() -> Self {
        AuthPolicy {
            use_identity_as_username: true,
            username_mismatch: UsernameMismatch::Ignore,
            client_id_policy: ClientIdPolicy::Prefix,
            client_id_separator: '-',
        }
    }
}

/// How the client of a connection authenticated at the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    /// No client certificate (plain TCP, or a TLS listener that does not ask for one).
    Anonymous,
    /// A verified client certificate with a usable identity.
    Certificate(PeerCertificate),
    /// A verified certificate whose identity cannot be used; CONNECT is refused.
    Rejected(String),
}

/// The principal a session belongs to. Only the same principal may resume it or take it over.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Owner {
    /// A client certificate, by identity and issuer DN.
    Certificate { identity: String, issuer: String },
    /// A password credential, by user name.
    Password { username: String },
    /// A client that did not authenticate.
    Anonymous,
    /// A password credential bound to a client id only (no user name), by that client id.
    PasswordClientId { client_id: String },
    /// A JSON Web Token, by issuer (`iss`, empty when absent) and subject (`sub`).
    Token { issuer: String, subject: String },
    /// A client the HTTP endpoint allowed, by the principal it named.
    Http { principal: String },
}

impl Owner {
    /// The name client ids are bound to: the certificate identity, the password user name (or
    /// the client id a password credential is bound to), the token subject, the HTTP principal;
    /// none for an anonymous client.
    pub fn name(&self) -> Option<&str> {
        match self {
            Owner::Certificate { identity, .. } => Some(identity),
            Owner::Password { username } => Some(username),
            Owner::Anonymous => None,
            Owner::PasswordClientId { client_id } => Some(client_id),
            Owner::Token { subject, .. } => Some(subject),
            Owner::Http { principal } => Some(principal),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Certificate { identity, issuer } => write!(f, "certificate {identity:?} issued by {issuer:?}"),
            Owner::Password { username } => write!(f, "password credential {username:?}"),
            Owner::Anonymous => f.write_str("anonymous"),
            Owner::PasswordClientId { client_id } => write!(f, "password credential of client id {client_id:?}"),
            Owner::Token { issuer, subject } => write!(f, "token subject {subject:?} issued by {issuer:?}"),
            Owner::Http { principal } => write!(f, "HTTP-authorized principal {principal:?}"),
        }
    }
}

/// Who a connected client is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Principal {
    /// The certificate identity, if the client presented a certificate.
    pub identity: Option<String>,
    /// The user name in force (the identity when `use_identity_as_username`).
    pub username: Option<String>,
    pub certificate: Option<PeerCertificate>,
    /// How a client without certificate proved who it is, if it did.
    pub verified: Option<Verified>,
}

/// What a provider other than `x509` verified.
#[derive(Debug, Clone, PartialEq)]
pub enum Verified {
    /// A password credential accepted the password.
    Password(PasswordKey),
    /// A JSON Web Token passed every check.
    Token(std::sync::Arc<VerifiedToken>),
    /// A SCRAM exchange proved the password of this user name's credential.
    Scram(String),
    /// The HTTP endpoint allowed the client.
    Http(std::sync::Arc<super::http::HttpGrant>),
}

/// How a password credential is found again (on every re-check of a live connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordKey {
    Username(String),
    /// A credential bound to a client id only.
    ClientId(String),
}

impl Principal {
    /// The owner of the sessions this principal creates: its certificate (identity and
    /// issuer), its password credential, its token's issuer and subject, or anonymous.
    pub fn owner(&self) -> Owner {
        match (&self.certificate, &self.verified) {
            (Some(cert), _) => Owner::Certificate { identity: cert.identity.clone(), issuer: cert.issuer.clone() },
            (None, Some(Verified::Password(PasswordKey::Username(username)))) => Owner::Password { username: username.clone() },
            (None, Some(Verified::Password(PasswordKey::ClientId(client_id)))) => Owner::PasswordClientId { client_id: client_id.clone() },
            (None, Some(Verified::Token(t))) => Owner::Token { issuer: t.issuer.clone(), subject: t.subject.clone() },
            // The same credential, whichever way its password was proved.
            (None, Some(Verified::Scram(username))) => Owner::Password { username: username.clone() },
            (None, Some(Verified::Http(grant))) => Owner::Http { principal: grant.principal.clone() },
            (None, None) => Owner::Anonymous,
        }
    }
}

fn not_authorized(reason: String) -> Refusal {
    Refusal { code: ConnectReturnCode::NotAuthorized, reason }
}

/// What a CONNECT claims about who the client is. The policy may rewrite the user name and an
/// assigned client id in place.
#[derive(Debug)]
pub struct ClaimedIdentity<'a> {
    pub client_id: &'a mut String,
    /// The client sent no client id; the broker generated `client_id`.
    pub assigned_client_id: bool,
    pub username: &'a mut Option<String>,
}

impl ClaimedIdentity<'_> {
    /// The same claim, borrowed again (for a call that may rewrite it).
    pub fn reborrow(&mut self) -> ClaimedIdentity<'_> {
        ClaimedIdentity { client_id: &mut *self.client_id, assigned_client_id: self.assigned_client_id, username: &mut *self.username }
    }
}

/// Applies the policy to what a validated CONNECT claims.
pub fn authenticate(peer: &PeerAuth, mut request: ClaimedIdentity<'_>, policy: &AuthPolicy) -> Result<Principal, Refusal> {
    let cert = match peer {
        PeerAuth::Anonymous => {
            return Ok(Principal { identity: None, username: request.username.clone(), certificate: None, verified: None })
        }
        PeerAuth::Rejected(reason) => return Err(not_authorized(reason.clone())),
        PeerAuth::Certificate(cert) => cert,
    };
    let identity = &cert.identity;
    let username = if policy.use_identity_as_username {
        if let Some(sent) = request.username.as_ref().filter(|sent| *sent != identity) {
            if policy.username_mismatch == UsernameMismatch::Refuse {
                return Err(not_authorized(format!("user name {sent:?} differs from the certificate identity {identity:?}")));
            }
        }
        Some(identity.clone())
    } else {
        request.username.clone()
    };
    policy.bind_client_id(identity, &mut request)?;
    *request.username = username.clone();
    Ok(Principal { identity: Some(identity.clone()), username, certificate: Some(cert.clone()), verified: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CONNECT's claimed identity, owned; an empty client id is assigned `rampart-9`.
    struct Request {
        client_id: String,
        assigned_client_id: bool,
        username: Option<String>,
    }

    impl Request {
        fn claim(&mut self) -> ClaimedIdentity<'_> {
            ClaimedIdentity { client_id: &mut self.client_id, assigned_client_id: self.assigned_client_id, username: &mut self.username }
        }
    }

    fn request(client_id: &str, username: Option<&str>) -> Request {
        let assigned_client_id = client_id.is_empty();
        let client_id = if assigned_client_id { "rampart-9".to_string() } else { client_id.to_string() };
        Request { client_id, assigned_client_id, username: username.map(str::to_string) }
    }

    fn peer(identity: &str) -> PeerAuth {
        PeerAuth::Certificate(PeerCertificate {
            identity: identity.into(),
            serial: "01".into(),
            issuer: "CN=CA".into(),
            not_before: 0,
            not_after: 0,
        })
    }

    #[test]
    fn identity_becomes_the_username() {
        let mut r = request("plc-7", Some("someone-else"));
        let p = authenticate(&peer("plc-7"), r.claim(), &AuthPolicy::default()).unwrap();
        assert_eq!(p.username.as_deref(), Some("plc-7"));
        assert_eq!(r.username.as_deref(), Some("plc-7"));
        let refuse = AuthPolicy { username_mismatch: UsernameMismatch::Refuse, ..AuthPolicy::default() };
        let err = authenticate(&peer("plc-7"), request("plc-7", Some("someone-else")).claim(), &refuse).unwrap_err();
        assert_eq!(err.code, ConnectReturnCode::NotAuthorized);
        assert!(authenticate(&peer("plc-7"), request("plc-7", Some("plc-7")).claim(), &refuse).is_ok());
    }

    #[test]
    fn client_id_policies_stop_session_takeover_by_another_device() {
        let prefix = AuthPolicy::default();
        assert!(authenticate(&peer("plc-7"), request("plc-7-telemetry", None).claim(), &prefix).is_ok());
        assert!(authenticate(&peer("plc-7"), request("plc-7", None).claim(), &prefix).is_ok());
        for spoof in ["plc-8", "plc-70", "plc-7x", "plc"] {
            let refused = authenticate(&peer("plc-7"), request(spoof, None).claim(), &prefix).unwrap_err();
            assert_eq!(refused.code, ConnectReturnCode::NotAuthorized, "{spoof}");
        }
        let dotted = AuthPolicy { client_id_separator: '.', ..prefix };
        assert!(authenticate(&peer("plc-7"), request("plc-7.a", None).claim(), &dotted).is_ok());
        assert!(authenticate(&peer("plc-7"), request("plc-7-a", None).claim(), &dotted).is_err());
        let exact = AuthPolicy { client_id_policy: ClientIdPolicy::MustEqualIdentity, ..prefix };
        assert!(authenticate(&peer("plc-7"), request("plc-7-x", None).claim(), &exact).is_err());
        assert!(authenticate(&peer("plc-7"), request("plc-7", None).claim(), &exact).is_ok());
        let any = AuthPolicy { client_id_policy: ClientIdPolicy::Any, ..prefix };
        assert!(authenticate(&peer("plc-7"), request("anything", None).claim(), &any).is_ok());
    }

    #[test]
    fn assigned_client_ids_follow_the_identity() {
        let mut r = request("", None);
        authenticate(&peer("plc-7"), r.claim(), &AuthPolicy::default()).unwrap();
        assert_eq!(r.client_id, "plc-7-rampart-9");
        let mut r = request("", None);
        authenticate(
            &peer("plc-7"),
            r.claim(),
            &AuthPolicy { client_id_policy: ClientIdPolicy::MustEqualIdentity, ..AuthPolicy::default() },
        )
        .unwrap();
        assert_eq!(r.client_id, "plc-7");
    }

    #[test]
    fn anonymous_and_rejected_peers() {
        let p = authenticate(&PeerAuth::Anonymous, request("x", Some("u")).claim(), &AuthPolicy::default()).unwrap();
        assert_eq!((p.identity, p.username.as_deref()), (None, Some("u")));
        let err = authenticate(&PeerAuth::Rejected("bad identity".into()), request("x", None).claim(), &AuthPolicy::default()).unwrap_err();
        assert_eq!(err.code, ConnectReturnCode::NotAuthorized);
    }

    #[test]
    fn client_ids_belong_to_names_and_a_bound_principal_wins_over_others() {
        let policy = AuthPolicy::default();
        let alice = Owner::Password { username: "alice".into() };
        let device = Owner::Certificate { identity: "device-2".into(), issuer: "CN=CA".into() };
        assert!(policy.binds("alice", "alice") && policy.binds("alice", "alice-ui") && !policy.binds("alice", "alicex"));
        assert!(policy.supersedes(&device, &Owner::Anonymous, "device-2"), "the device wins its id from an anonymous session");
        assert!(policy.supersedes(&device, &alice, "device-2-ui"), "and from a password principal's");
        assert!(!policy.supersedes(&alice, &device, "device-2"), "never the other way round");
        assert!(!policy.supersedes(&Owner::Anonymous, &alice, "x"), "an anonymous client is bound to nothing");
        let any = AuthPolicy { client_id_policy: ClientIdPolicy::Any, ..policy };
        assert!(!any.supersedes(&device, &Owner::Anonymous, "device-2"), "`any` binds nothing: the first session keeps its id");

        let mut assigned = request("", None);
        policy.bind_client_id("alice", &mut assigned.claim()).unwrap();
        assert_eq!(assigned.client_id, "alice-rampart-9", "a generated id goes in the name's namespace");
        let mut chosen = request("device-2", None);
        let err = policy.bind_client_id("alice", &mut chosen.claim()).unwrap_err();
        assert_eq!(err.code, ConnectReturnCode::NotAuthorized);
        let exact = AuthPolicy { client_id_policy: ClientIdPolicy::MustEqualIdentity, ..policy };
        let mut assigned = request("", None);
        exact.bind_client_id("alice", &mut assigned.claim()).unwrap();
        assert_eq!(assigned.client_id, "alice");
    }
}
