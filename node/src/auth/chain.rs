//! The provider chain: the enabled providers (`x509`, `basic`, `jwt`, `http`) tried in the
//! configured order on what a CONNECT presents; the first that authenticates the client makes its
//! [`Principal`]. Shared by the listeners and `rampart admin check-access`, so both decide alike.
//! Blocking (argon2id, signature checks, the HTTP call): callers run it off the async threads.

use mqttbytes::v5::ConnectReturnCode;

use super::http::{CertificateQuery, Decision, HttpDelegate, HttpQuery};
use super::index::{AuthIndex, PasswordCheck};
use super::policy::{self, AuthPolicy, ClaimedIdentity, PasswordKey, PeerAuth, Principal, Verified};
use super::state::OnUnavailable;
use super::state::ProviderKind;
use super::Refusal;

/// What a CONNECT presents beyond its claimed identity.
#[derive(Clone, Copy)]
pub struct Presented<'a> {
    pub password: Option<&'a str>,
    /// Seconds since the epoch, for token expiry.
    pub now: i64,
    pub password_check: PasswordCheck,
    /// `tcp`, `tls`, `ws` or `wss` (told to the HTTP endpoint).
    pub listener: &'a str,
    pub peer: Option<std::net::IpAddr>,
    /// The node's HTTP delegation client, and the runtime its calls are driven on (the chain
    /// runs on a blocking thread).
    pub http: Option<(&'a HttpDelegate, &'a tokio::runtime::Handle)>,
}

/// Whether the chain may block on the network (the `http` provider is enabled).
pub fn calls_out(index: &AuthIndex) -> bool {
    index.http_settings().is_some()
}

/// Whether anything in the CONNECT needs a provider that costs CPU (a password or a user name
/// to check): if not, the chain is cheap enough to run on the async threads.
pub fn is_costly(username: Option<&str>, password: Option<&str>) -> bool {
    username.is_some() || password.is_some()
}

/// The chain's answer without running it, when `x509` comes first and authenticates the client's
/// certificate: then nothing after it is tried, so a certificate client costs no password check
/// slot and no blocking thread even if it sends a user name and password. `None` (and `request`
/// untouched) otherwise.
pub fn certificate_first(index: &AuthIndex, peer: &PeerAuth, request: ClaimedIdentity<'_>, policy: &AuthPolicy) -> Option<Principal> {
    if index.provider_order().first() != Some(&ProviderKind::X509) || !matches!(peer, PeerAuth::Certificate(_)) {
        return None;
    }
    let (mut client_id, mut username) = (request.client_id.clone(), request.username.clone());
    let claim = ClaimedIdentity { client_id: &mut client_id, assigned_client_id: request.assigned_client_id, username: &mut username };
    let principal = policy::authenticate(peer, claim, policy).ok()?;
    (*request.client_id, *request.username) = (client_id, username);
    Some(principal)
}

/// Runs the chain. A provider that does not apply (no certificate for `x509`; neither user name
/// nor client-id credential for `basic`; no password for `jwt`) is skipped; one that applies
/// and fails is remembered and the next is tried. No provider applied: an anonymous principal
/// (the authorization state decides whether anonymous clients may connect). Every provider that
/// applied failed: the refusal names each reason, with 0x87 (not authorized) when one of them
/// verified what the client presented and refused it, else 0x86 (bad user name or password) when
/// a password or token was wrong.
pub fn authenticate(
    index: &AuthIndex,
    peer: &PeerAuth,
    mut request: ClaimedIdentity<'_>,
    policy: &AuthPolicy,
    presented: Presented<'_>,
) -> Result<Principal, Refusal> {
    let mut failures: Vec<(ProviderKind, Refusal)> = Vec::new();
    for &provider in index.provider_order() {
        let outcome = match provider {
            ProviderKind::X509 if *peer == PeerAuth::Anonymous => continue,
            ProviderKind::X509 => {
                let claim = ClaimedIdentity {
                    client_id: &mut *request.client_id,
                    assigned_client_id: request.assigned_client_id,
                    username: &mut *request.username,
                };
                policy::authenticate(peer, claim, policy)
            }
            ProviderKind::Basic => {
                match index.check_password(request.username.as_deref(), request.client_id, presented.password, presented.password_check) {
                    Ok(None) => continue,
                    Ok(Some(key)) => Ok(Principal {
                        identity: None,
                        // Only a user name the password verified is one (`%u`): a credential
                        // bound to a client id verifies none, whatever the client sent.
                        username: match &key {
                            PasswordKey::Username(name) => Some(name.clone()),
                            PasswordKey::ClientId(_) => None,
                        },
                        certificate: None,
                        verified: Some(Verified::Password(key)),
                    }),
                    Err(e) => Err(e),
                }
            }
            // Driven by the CONNECT's Authentication Method (MQTT 5 AUTH), never by this chain.
            ProviderKind::Scram => continue,
            ProviderKind::Http => {
                let (Some(settings), Some((delegate, runtime))) = (index.http_settings(), presented.http) else { continue };
                let query = HttpQuery {
                    client_id: request.client_id,
                    username: request.username.as_deref(),
                    password: presented.password,
                    certificate: match peer {
                        PeerAuth::Certificate(cert) => Some(CertificateQuery::of(cert)),
                        _ => None,
                    },
                    listener: presented.listener,
                    peer: presented.peer,
                };
                match runtime.block_on(delegate.decide(settings, &query)) {
                    Decision::Allow(grant) => Ok(Principal {
                        identity: None,
                        username: Some(grant.principal.clone()),
                        certificate: None,
                        verified: Some(Verified::Http(grant)),
                    }),
                    Decision::Deny(reason) => {
                        let code = if presented.password.is_some() {
                            ConnectReturnCode::BadUserNamePassword
                        } else {
                            ConnectReturnCode::NotAuthorized
                        };
                        Err(Refusal { code, reason: format!("denied: {reason}") })
                    }
                    Decision::Unavailable(_) if settings.on_unavailable == OnUnavailable::Next => continue,
                    Decision::Unavailable(reason) => {
                        Err(Refusal { code: ConnectReturnCode::ServerUnavailable, reason: format!("endpoint unavailable: {reason}") })
                    }
                }
            }
            ProviderKind::Jwt => {
                let Some(token) = presented.password else { continue };
                index.verify_token(token, request.client_id, request.username.as_deref(), Some(presented.now)).map(|t| Principal {
                    identity: None,
                    username: Some(t.subject.clone()),
                    certificate: None,
                    verified: Some(Verified::Token(std::sync::Arc::new(t))),
                })
            }
        };
        match outcome.and_then(|principal| bind_client_id(principal, policy, &mut request)) {
            Ok(principal) => return Ok(principal),
            Err(refusal) => failures.push((provider, refusal)),
        }
    }
    if failures.is_empty() {
        return Ok(Principal { identity: None, username: request.username.clone(), certificate: None, verified: None });
    }
    // A provider that verified what the client presented and refused it (0x87: a token whose
    // binding does not hold, a refused certificate identity or client id, an HTTP deny) says
    // more than one that did not recognise it (0x86: wrong password, unknown user name, bad token).
    let code = [ConnectReturnCode::NotAuthorized, ConnectReturnCode::BadUserNamePassword]
        .into_iter()
        .find(|code| failures.iter().any(|(_, r)| r.code == *code))
        .unwrap_or(failures[0].1.code);
    let reason = failures.iter().map(|(p, r)| format!("{p}: {}", r.reason)).collect::<Vec<_>>().join("; ");
    Err(Refusal { code, reason })
}

/// Puts the client id in the namespace of a principal other than a certificate, as the `x509`
/// provider does for a certificate identity (see [`AuthPolicy::bind_client_id`]).
pub fn bind_client_id(principal: Principal, policy: &AuthPolicy, request: &mut ClaimedIdentity<'_>) -> Result<Principal, Refusal> {
    if principal.certificate.is_none() {
        if let Some(name) = principal.owner().name() {
            policy.bind_client_id(name, request)?;
        }
    }
    Ok(principal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::PeerCertificate;
    use crate::auth::policy::Owner;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    const SECRET: &str = "chain-test-secret-chain-test-secret";
    const NOW: i64 = 1_800_000_000;

    fn index(order: &str) -> AuthIndex {
        let hash = crate::auth::password::hash("pw").unwrap();
        let text = format!(
            r#"
            [providers]
            order = {order}
            [providers.jwt]
            hmac_secret = "{SECRET}"
            rules = [{{ access = "write", pattern = "jwt/%u" }}]

            [[credentials]]
            name = "plc-1"
            x509 = {{ identity = "plc-1" }}

            [[credentials]]
            name = "plc-1-password"
            password = {{ username = "plc-1", hash = "{hash}" }}
            "#
        );
        AuthIndex::build(toml::from_str(&text).unwrap()).unwrap()
    }

    fn cert() -> PeerAuth {
        PeerAuth::Certificate(PeerCertificate {
            identity: "plc-1".into(),
            serial: "01".into(),
            issuer: "CN=CA".into(),
            not_before: 0,
            not_after: 0,
        })
    }

    fn run(index: &AuthIndex, peer: &PeerAuth, username: Option<&str>, password: Option<&str>) -> Result<Principal, Refusal> {
        run_as(index, peer, "plc-1", username, password)
    }

    /// [`run`] with a client id of the test's choice.
    fn run_as(
        index: &AuthIndex,
        peer: &PeerAuth,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Principal, Refusal> {
        let (mut client_id, mut username) = (client_id.to_string(), username.map(str::to_string));
        let claim = ClaimedIdentity { client_id: &mut client_id, assigned_client_id: false, username: &mut username };
        let presented = Presented { password, now: NOW, password_check: PasswordCheck::Verify, listener: "tcp", peer: None, http: None };
        authenticate(index, peer, claim, &AuthPolicy::default(), presented)
    }

    fn token(sub: &str) -> String {
        let claims = serde_json::json!({"sub": sub, "exp": NOW + 60});
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    #[test]
    fn the_first_provider_that_authenticates_wins() {
        let x509_first = index(r#"["x509", "basic"]"#);
        let owner = run(&x509_first, &cert(), Some("plc-1"), Some("pw")).unwrap().owner();
        assert!(matches!(owner, Owner::Certificate { .. }), "{owner}");
        let basic_first = index(r#"["basic", "x509"]"#);
        let owner = run(&basic_first, &cert(), Some("plc-1"), Some("pw")).unwrap().owner();
        assert_eq!(owner, Owner::Password { username: "plc-1".into() });
        // A wrong password under basic-first falls through to the certificate.
        let owner = run(&basic_first, &cert(), Some("plc-1"), Some("wrong")).unwrap().owner();
        assert!(matches!(owner, Owner::Certificate { .. }), "{owner}");
    }

    #[test]
    fn a_certificate_decides_first_without_touching_a_refused_request() {
        let x509_first = index(r#"["x509", "basic"]"#);
        let (mut client_id, mut username) = ("plc-1".to_string(), Some("someone".to_string()));
        let claim = ClaimedIdentity { client_id: &mut client_id, assigned_client_id: false, username: &mut username };
        let p = certificate_first(&x509_first, &cert(), claim, &AuthPolicy::default()).unwrap();
        assert!(matches!(p.owner(), Owner::Certificate { .. }));
        assert_eq!(username.as_deref(), Some("plc-1"), "the identity became the user name");
        let (mut client_id, mut username) = ("plc-2".to_string(), None);
        let claim = ClaimedIdentity { client_id: &mut client_id, assigned_client_id: false, username: &mut username };
        assert!(certificate_first(&x509_first, &cert(), claim, &AuthPolicy::default()).is_none(), "client id of another device");
        let basic_first = index(r#"["basic", "x509"]"#);
        let claim = ClaimedIdentity { client_id: &mut client_id, assigned_client_id: false, username: &mut username };
        assert!(certificate_first(&basic_first, &cert(), claim, &AuthPolicy::default()).is_none());
    }

    #[test]
    fn disabled_providers_are_skipped() {
        let basic_only = index(r#"["basic"]"#);
        let p = run(&basic_only, &cert(), None, None).unwrap();
        assert_eq!(p.owner(), Owner::Anonymous, "the certificate is not looked at");
        assert!(basic_only.authorize(&p, "plc-1").is_err(), "anonymous clients are not allowed");
        let err = run(&basic_only, &PeerAuth::Anonymous, None, Some(&token("app"))).map(|p| p.owner());
        assert_eq!(err, Ok(Owner::Anonymous), "jwt disabled: the token is not looked at");
    }

    #[test]
    fn jwt_clients_own_their_sessions_by_subject() {
        let chain = index(r#"["x509", "basic", "jwt"]"#);
        let p = run_as(&chain, &PeerAuth::Anonymous, "app-7-ui", Some("whoever"), Some(&token("app-7"))).unwrap();
        assert_eq!(p.owner(), Owner::Token { issuer: String::new(), subject: "app-7".into() });
        let grant = chain.authorize(&p, "app-7-ui").unwrap();
        assert!(grant.acl.may_publish("jwt/app-7") && !grant.acl.may_publish("jwt/whoever"));
        assert_eq!(grant.expires_at, None, "disconnect_at_expiry is off");
        // The client id is the subject's (client_id_policy prefix), as for a certificate.
        let err = run_as(&chain, &PeerAuth::Anonymous, "plc-1", None, Some(&token("app-7"))).unwrap_err();
        assert!(err.reason.contains("client id \"plc-1\" is not allowed for identity \"app-7\""), "{}", err.reason);
        // A subject with a wildcard never widens a rule.
        let p = run_as(&chain, &PeerAuth::Anonymous, "#", None, Some(&token("#"))).unwrap();
        assert!(!chain.authorize(&p, "#").unwrap().acl.may_publish("jwt/x"));
    }

    #[test]
    fn a_verified_token_bound_to_another_client_id_is_not_authorized_even_when_basic_also_failed() {
        // MQTT 3.1.1 sends a user name with the token, so `basic` runs too and fails (0x86).
        let text =
            format!("[providers]\norder = [\"basic\", \"jwt\"]\n[providers.jwt]\nhmac_secret = \"{SECRET}\"\nclient_id_claim = \"cid\"\n");
        let chain = AuthIndex::build(toml::from_str(&text).unwrap()).unwrap();
        let claims = serde_json::json!({"sub": "app-7", "exp": NOW + 60, "cid": "app-7-other"});
        let bound = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
        let err = run_as(&chain, &PeerAuth::Anonymous, "app-7-ui", Some("app-7"), Some(&bound)).unwrap_err();
        assert_eq!(err.code, ConnectReturnCode::NotAuthorized, "{}", err.reason);
        assert!(err.reason.contains("basic: ") && err.reason.contains("jwt: token: "), "{}", err.reason);
    }

    #[test]
    fn when_every_provider_fails_the_refusal_names_each() {
        let chain = index(r#"["basic", "jwt"]"#);
        let err = run(&chain, &PeerAuth::Anonymous, Some("plc-1"), Some("wrong")).unwrap_err();
        assert_eq!(err.code, ConnectReturnCode::BadUserNamePassword);
        assert!(err.reason.contains("basic: ") && err.reason.contains("jwt: token: not a JWT"), "{}", err.reason);
        let ok = run(&chain, &PeerAuth::Anonymous, Some("plc-1"), Some("pw")).unwrap();
        assert_eq!(ok.verified, Some(Verified::Password(PasswordKey::Username("plc-1".into()))));
    }
}
