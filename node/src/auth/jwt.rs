//! The `jwt` provider: verification keys compiled from the replicated `JwtSettings` (HMAC secret,
//! PEM public keys, a JWKS document selected by `kid`), and the verification of a token from the
//! CONNECT password field — signature (via `jsonwebtoken`, ring), `exp`/`nbf` with leeway,
//! `iss`/`aud`, claim bindings to the client id and user name — into a [`VerifiedToken`] whose
//! client type and rules come from its claims. Pure: time is passed in.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mqttbytes::v5::ConnectReturnCode;
use serde_json::{Map, Value};

use super::acl;
use super::state::{Access, ClientType, JwtSettings, Rule};
use super::Refusal;

const RSA: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];
const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// One verification key and the algorithms it may verify.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: &'static [Algorithm],
}

/// The compiled `jwt` provider.
pub struct JwtVerifier {
    keys: Vec<Key>,
    settings: JwtSettings,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

/// A token that passed every check, and what its claims grant.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The `sub` claim: the principal, and `%u` in rules.
    pub subject: String,
    /// The `iss` claim, if any (part of the session owner).
    pub issuer: String,
    /// The `exp` claim, seconds since the epoch.
    pub expires_at: i64,
    /// From the client type claim, if present.
    pub client_type: Option<ClientType>,
    /// From the publish/subscribe claims, if either is present.
    pub rules: Option<Vec<Rule>>,
    /// The token itself and the user name it came with, to verify it again when the keys or
    /// settings change.
    pub(crate) token: String,
    pub(crate) username: Option<String>,
}

fn bad_token(reason: String) -> Refusal {
    Refusal { code: ConnectReturnCode::BadUserNamePassword, reason: format!("token: {reason}") }
}

fn not_authorized(reason: String) -> Refusal {
    Refusal { code: ConnectReturnCode::NotAuthorized, reason: format!("token: {reason}") }
}

impl JwtVerifier {
    /// Compiles the keys; errors name the setting (`providers.jwt.public_keys[1]: …`).
    pub fn new(settings: &JwtSettings) -> Result<JwtVerifier, String> {
        let at = |key: &str, e: String| format!("providers.jwt.{key}: {e}");
        let mut keys = Vec::new();
        if let Some(secret) = &settings.hmac_secret {
            if secret.len() < 32 {
                return Err(at("hmac_secret", "must be at least 32 bytes".into()));
            }
            keys.push(Key { kid: None, key: DecodingKey::from_secret(secret.as_bytes()), algorithms: HMAC });
        }
        for (i, pem) in settings.public_keys.iter().enumerate() {
            let pem = pem.as_bytes();
            let (key, algorithms) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                (key, RSA)
            } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
                (key, &[Algorithm::ES256, Algorithm::ES384][..])
            } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
                (key, &[Algorithm::EdDSA][..])
            } else {
                return Err(at(&format!("public_keys[{i}]"), "not a PEM RSA, EC or Ed25519 public key".into()));
            };
            keys.push(Key { kid: None, key, algorithms });
        }
        if let Some(jwks) = &settings.jwks {
            let set: JwkSet = serde_json::from_str(jwks).map_err(|e| at("jwks", e.to_string()))?;
            for (i, jwk) in set.keys.iter().enumerate() {
                let algorithms: &'static [Algorithm] = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => RSA,
                    AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => &[Algorithm::ES256],
                    AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => &[Algorithm::ES384],
                    AlgorithmParameters::OctetKeyPair(_) => &[Algorithm::EdDSA],
                    _ => {
                        return Err(at(&format!("jwks.keys[{i}]"), "only RSA, EC P-256/P-384 and Ed25519 public keys are accepted".into()))
                    }
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| at(&format!("jwks.keys[{i}]"), e.to_string()))?;
                keys.push(Key { kid: jwk.common.key_id.clone(), key, algorithms });
            }
        }
        if keys.is_empty() {
            return Err("providers.jwt: give hmac_secret, public_keys or jwks".into());
        }
        for name in [&settings.client_type_claim, &settings.publish_claim, &settings.subscribe_claim] {
            if name.is_empty() {
                return Err(at("claim names", "must not be empty".into()));
            }
        }
        settings.rules.iter().try_for_each(acl::validate_rule).map_err(|e| at("rules", e))?;
        Ok(JwtVerifier { keys, settings: settings.clone() })
    }

    pub fn settings(&self) -> &JwtSettings {
        &self.settings
    }

    /// Verifies `token` for a CONNECT with `client_id` and `username`. With `now`, `exp` and `nbf`
    /// are checked against it (leeway allowed); without, they are not (the re-check of a live
    /// connection: expiry there is the connection's timer's business).
    pub fn verify(&self, token: &str, client_id: &str, username: Option<&str>, now: Option<i64>) -> Result<VerifiedToken, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad_token(format!("not a JWT: {e}")))?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) if self.keys.iter().any(|k| k.kid.as_ref() == Some(kid)) => {
                self.keys.iter().filter(|k| k.kid.as_ref() == Some(kid)).collect()
            }
            Some(kid) if self.keys.iter().all(|k| k.kid.is_some()) => return Err(bad_token(format!("unknown key id {kid:?}"))),
            _ => self.keys.iter().filter(|k| k.kid.is_none() || header.kid.is_none()).collect(),
        };
        let candidates: Vec<&Key> = candidates.into_iter().filter(|k| k.algorithms.contains(&header.alg)).collect();
        if candidates.is_empty() {
            return Err(bad_token(format!("no key for algorithm {:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        // Time, issuer and audience are checked below, on claims of checked types.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut last_error = None;
        let claims = candidates.iter().find_map(|k| match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &validation) {
            Ok(data) => Some(data.claims),
            Err(e) => {
                last_error = Some(e);
                None
            }
        });
        let claims = claims.ok_or_else(|| bad_token(last_error.map(|e| e.to_string()).unwrap_or_default()))?;
        self.check_claims(&claims, client_id, username, now)?;
        let mut verified = self.grant_of(&claims)?;
        verified.token = token.to_string();
        verified.username = username.map(str::to_string);
        Ok(verified)
    }

    fn check_claims(&self, claims: &Map<String, Value>, client_id: &str, username: Option<&str>, now: Option<i64>) -> Result<(), Refusal> {
        let s = &self.settings;
        let leeway = s.leeway_secs as i64;
        let exp = time_claim(claims, "exp")?.ok_or_else(|| bad_token("no exp claim".into()))?;
        if let Some(now) = now {
            if now > exp + leeway {
                return Err(bad_token(format!("expired at {exp}")));
            }
            if let Some(nbf) = time_claim(claims, "nbf")? {
                if now + leeway < nbf {
                    return Err(bad_token(format!("not valid before {nbf}")));
                }
            }
        }
        if let Some(issuer) = &s.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(issuer) {
                return Err(bad_token(format!("issuer is not {issuer:?}")));
            }
        }
        if let Some(audience) = &s.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => a == audience,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
                _ => false,
            };
            if !ok {
                return Err(bad_token(format!("audience does not include {audience:?}")));
            }
        }
        let bound = |name: &Option<String>, value: Option<&str>, what: &str| match name {
            Some(claim) if claims.get(claim).and_then(Value::as_str) != value || value.is_none() => {
                Err(not_authorized(format!("claim {claim:?} does not equal the {what}")))
            }
            _ => Ok(()),
        };
        bound(&s.client_id_claim, Some(client_id), "client id")?;
        bound(&s.username_claim, username, "user name")
    }

    fn grant_of(&self, claims: &Map<String, Value>) -> Result<VerifiedToken, Refusal> {
        let s = &self.settings;
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(bad_token("no sub claim".into())),
        };
        let client_type = match claims.get(&s.client_type_claim) {
            None => None,
            Some(Value::String(t)) if t.eq_ignore_ascii_case("device") => Some(ClientType::Device),
            Some(Value::String(t)) if t.eq_ignore_ascii_case("application") => Some(ClientType::Application),
            Some(other) => return Err(not_authorized(format!("claim {:?}: {other} is not DEVICE or APPLICATION", s.client_type_claim))),
        };
        let mut rules = None;
        for (claim, access) in [(&s.publish_claim, Access::Write), (&s.subscribe_claim, Access::Read)] {
            let Some(value) = claims.get(claim) else { continue };
            let filters = value.as_array().filter(|list| list.iter().all(Value::is_string));
            let filters = filters.ok_or_else(|| not_authorized(format!("claim {claim:?}: expected a list of topic filters")))?;
            let list: &mut Vec<Rule> = rules.get_or_insert_with(Vec::new);
            for filter in filters.iter().filter_map(Value::as_str) {
                let rule = Rule { access, topic_regex: None, pattern: Some(filter.to_string()), deny: false };
                acl::validate_rule(&rule).map_err(|e| not_authorized(format!("claim {claim:?}: {e}")))?;
                list.push(rule);
            }
        }
        let issuer = claims.get("iss").and_then(Value::as_str).unwrap_or_default().to_string();
        let expires_at = time_claim(claims, "exp")?.unwrap_or_default();
        Ok(VerifiedToken { subject, issuer, expires_at, client_type, rules, token: String::new(), username: None })
    }
}

/// A NumericDate claim; any other type is refused (a string `exp` must not pass as absent).
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).map(Some).ok_or_else(|| bad_token(format!("{name}: not a number")))
        }
        Some(other) => Err(bad_token(format!("{name}: {other} is not a number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";
    const NOW: i64 = 1_800_000_000;

    fn settings() -> JwtSettings {
        toml::from_str(&format!("hmac_secret = \"{SECRET}\"\nissuer = \"idp\"\naudience = \"rampart\"\nclient_id_claim = \"cid\"")).unwrap()
    }

    fn hs(claims: Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn good() -> Value {
        json!({"sub": "app-1", "iss": "idp", "aud": ["x", "rampart"], "exp": NOW + 600, "nbf": NOW - 10, "cid": "app-1-c"})
    }

    #[test]
    fn a_valid_token_grants_its_claims() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let mut claims = good();
        claims["client_type"] = json!("APPLICATION");
        claims["mqtt_pub"] = json!(["up/%u/#"]);
        let t = v.verify(&hs(claims), "app-1-c", None, Some(NOW)).unwrap();
        assert_eq!((t.subject.as_str(), t.issuer.as_str(), t.expires_at), ("app-1", "idp", NOW + 600));
        assert_eq!(t.client_type, Some(ClientType::Application));
        let rules = t.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!((rules[0].access, rules[0].pattern.as_deref()), (Access::Write, Some("up/%u/#")));
        let plain = v.verify(&hs(good()), "app-1-c", None, Some(NOW)).unwrap();
        assert!(plain.rules.is_none() && plain.client_type.is_none(), "absent claims fall back to the defaults");
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let with = |key: &str, value: Value| {
            let mut c = good();
            c[key] = value;
            hs(c)
        };
        let without = |key: &str| {
            let mut c = good();
            c.as_object_mut().unwrap().remove(key);
            hs(c)
        };
        let forged =
            encode(&Header::new(Algorithm::HS256), &good(), &EncodingKey::from_secret(b"another-secret-another-secret-xx")).unwrap();
        for (token, needle, code) in [
            ("not-a-token".to_string(), "not a JWT", ConnectReturnCode::BadUserNamePassword),
            (forged, "InvalidSignature", ConnectReturnCode::BadUserNamePassword),
            (with("exp", json!(NOW - 61)), "expired", ConnectReturnCode::BadUserNamePassword),
            (with("exp", json!("9999999999")), "not a number", ConnectReturnCode::BadUserNamePassword),
            (without("exp"), "no exp", ConnectReturnCode::BadUserNamePassword),
            (with("nbf", json!(NOW + 61)), "not valid before", ConnectReturnCode::BadUserNamePassword),
            (with("iss", json!("other")), "issuer", ConnectReturnCode::BadUserNamePassword),
            (with("aud", json!("other")), "audience", ConnectReturnCode::BadUserNamePassword),
            (without("sub"), "no sub", ConnectReturnCode::BadUserNamePassword),
            (with("cid", json!("someone-else")), "client id", ConnectReturnCode::NotAuthorized),
            (with("mqtt_sub", json!("a/#")), "list of topic filters", ConnectReturnCode::NotAuthorized),
            (with("mqtt_sub", json!(["a/#/b"])), "mqtt_sub", ConnectReturnCode::NotAuthorized),
            (with("client_type", json!("ROBOT")), "DEVICE or APPLICATION", ConnectReturnCode::NotAuthorized),
        ] {
            let err = v.verify(&token, "app-1-c", None, Some(NOW)).unwrap_err();
            assert!(err.reason.contains(needle), "{needle}: {}", err.reason);
            assert_eq!(err.code, code, "{needle}");
        }
        let within_leeway = with("exp", json!(NOW - 59));
        assert!(v.verify(&within_leeway, "app-1-c", None, Some(NOW)).is_ok());
        assert!(v.verify(&with("exp", json!(NOW - 3600)), "app-1-c", None, None).is_ok(), "the live re-check ignores time");
    }

    #[test]
    fn the_algorithm_must_fit_the_key() {
        // An HMAC token must not verify against a public key used as a secret, nor "none".
        let rsa = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let public = rsa::pkcs8::EncodePublicKey::to_public_key_pem(&rsa.to_public_key(), rsa::pkcs8::LineEnding::LF).unwrap();
        let v = JwtVerifier::new(&JwtSettings { public_keys: vec![public.clone()], hmac_secret: None, ..settings() }).unwrap();
        let confused = encode(&Header::new(Algorithm::HS256), &good(), &EncodingKey::from_secret(public.as_bytes())).unwrap();
        assert!(v.verify(&confused, "app-1-c", None, Some(NOW)).unwrap_err().reason.contains("no key for algorithm"));
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(good().to_string().as_bytes()));
        assert!(v.verify(&none, "app-1-c", None, Some(NOW)).is_err());
        let pem = rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&rsa, rsa::pkcs8::LineEnding::LF).unwrap();
        let signed = encode(&Header::new(Algorithm::RS256), &good(), &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()).unwrap();
        assert!(v.verify(&signed, "app-1-c", None, Some(NOW)).is_ok());
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
        let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap();
        let x = b64(ring::signature::KeyPair::public_key(&pair).as_ref());
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k2"}]}).to_string();
        let v = JwtVerifier::new(&JwtSettings { jwks: Some(jwks), hmac_secret: None, ..settings() }).unwrap();
        let sign = |kid: &str| {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(kid.into());
            encode(&header, &good(), &EncodingKey::from_ed_der(ed.as_ref())).unwrap()
        };
        assert!(v.verify(&sign("k2"), "app-1-c", None, Some(NOW)).is_ok());
        assert!(v.verify(&sign("k1"), "app-1-c", None, Some(NOW)).unwrap_err().reason.contains("unknown key id"));
    }

    #[test]
    fn invalid_settings_name_the_key() {
        for (s, needle) in [
            (JwtSettings { hmac_secret: None, ..settings() }, "give hmac_secret"),
            (JwtSettings { hmac_secret: Some("short".into()), ..settings() }, "hmac_secret"),
            (JwtSettings { public_keys: vec!["junk".into()], ..settings() }, "public_keys[0]"),
            (JwtSettings { jwks: Some("{".into()), ..settings() }, "jwks"),
        ] {
            assert!(JwtVerifier::new(&s).unwrap_err().contains(needle), "{needle}");
        }
    }
}
