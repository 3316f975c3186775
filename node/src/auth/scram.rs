//! The `scram` provider's mechanism: SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802 / RFC 7677, no
//! channel binding) as carried by MQTT 5 enhanced authentication. Owns the stored verifier
//! format (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64, as PostgreSQL
//! stores it: never the password), its generation, and the server side of one exchange as a
//! pure two-step state machine. Primitives are ring's (PBKDF2, HMAC, SHA-2); comparisons are
//! constant time (`subtle`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use mqttbytes::v5::ConnectReturnCode;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};
use subtle::ConstantTimeEq;

use super::Refusal;

/// Fewest PBKDF2 iterations a stored verifier may have (RFC 7677's minimum).
pub const MIN_ITERATIONS: u32 = 4096;

/// A SCRAM hash function, named as the MQTT Authentication Method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Sha256,
    Sha512,
}

impl Mechanism {
    /// The Authentication Method names this provider answers to.
    pub fn from_method(method: &str) -> Option<Mechanism> {
        match method {
            "SCRAM-SHA-256" => Some(Mechanism::Sha256),
            "SCRAM-SHA-512" => Some(Mechanism::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha256 => "SCRAM-SHA-256",
            Mechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Mechanism::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Mechanism::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        let algorithm = match self {
            Mechanism::Sha256 => hmac::HMAC_SHA256,
            Mechanism::Sha512 => hmac::HMAC_SHA512,
        };
        hmac::sign(&hmac::Key::new(algorithm, key), data).as_ref().to_vec()
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        let algorithm = match self {
            Mechanism::Sha256 => &digest::SHA256,
            Mechanism::Sha512 => &digest::SHA512,
        };
        digest::digest(algorithm, data).as_ref().to_vec()
    }

    fn len(self) -> usize {
        match self {
            Mechanism::Sha256 => 32,
            Mechanism::Sha512 => 64,
        }
    }
}

/// A stored SCRAM credential: what the server needs, and nothing that logs a client in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    pub mechanism: Mechanism,
    pub iterations: u32,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl Verifier {
    /// Derives a verifier from a password with a fresh random salt. The password is prepared
    /// with SASLprep (RFC 4013), as SCRAM clients prepare theirs: non-ASCII spaces become spaces,
    /// soft hyphens vanish, forms are NFKC-normalised; prohibited characters are refused.
    pub fn generate(mechanism: Mechanism, password: &str, iterations: u32) -> Result<Verifier, String> {
        if iterations < MIN_ITERATIONS {
            return Err(format!("iterations: at least {MIN_ITERATIONS}"));
        }
        let prepared = stringprep::saslprep(password).map_err(|e| format!("the password is not valid for SASLprep: {e}"))?;
        if prepared.is_empty() {
            return Err("the password must not be empty (after SASLprep)".into());
        }
        let mut salt = vec![0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| "no randomness".to_string())?;
        Ok(Verifier::derive(mechanism, prepared.as_bytes(), &salt, iterations))
    }

    fn derive(mechanism: Mechanism, password: &[u8], salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = vec![0u8; mechanism.len()];
        let rounds = std::num::NonZeroU32::new(iterations.max(1)).expect("at least 1");
        pbkdf2::derive(mechanism.pbkdf2(), rounds, salt, password, &mut salted);
        let client_key = mechanism.hmac(&salted, b"Client Key");
        Verifier {
            mechanism,
            iterations,
            salt: salt.to_vec(),
            stored_key: mechanism.hash(&client_key),
            server_key: mechanism.hmac(&salted, b"Server Key"),
        }
    }

    /// Parses the stored form; errors say which part is wrong.
    pub fn parse(text: &str) -> Result<Verifier, String> {
        let form = "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (as printed by `rampart passwd --scram`)";
        let mut parts = text.split('$');
        let (Some(method), Some(params), Some(keys), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(form.into());
        };
        let mechanism = Mechanism::from_method(method).ok_or_else(|| format!("unknown mechanism {method:?}: {form}"))?;
        let (iterations, salt) = params.split_once(':').ok_or(form)?;
        let (stored, server) = keys.split_once(':').ok_or(form)?;
        let iterations: u32 = iterations.parse().map_err(|_| format!("iterations {iterations:?}: not a number"))?;
        if iterations < MIN_ITERATIONS {
            return Err(format!("iterations: at least {MIN_ITERATIONS}"));
        }
        let decode = |what: &str, b: &str| B64.decode(b).map_err(|e| format!("{what}: {e}"));
        let verifier = Verifier {
            mechanism,
            iterations,
            salt: decode("salt", salt)?,
            stored_key: decode("StoredKey", stored)?,
            server_key: decode("ServerKey", server)?,
        };
        if verifier.stored_key.len() != mechanism.len() || verifier.server_key.len() != mechanism.len() || verifier.salt.is_empty() {
            return Err(format!("key lengths do not fit {}", mechanism.name()));
        }
        Ok(verifier)
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (salt, stored, server) = (B64.encode(&self.salt), B64.encode(&self.stored_key), B64.encode(&self.server_key));
        write!(f, "{}${}:{salt}${stored}:{server}", self.mechanism.name(), self.iterations)
    }
}

fn malformed(reason: &str) -> Refusal {
    Refusal { code: ConnectReturnCode::NotAuthorized, reason: format!("SCRAM: {reason}") }
}

fn bad_proof(username: &str) -> Refusal {
    Refusal { code: ConnectReturnCode::BadUserNamePassword, reason: format!("SCRAM: unknown user name {username:?} or wrong password") }
}

/// The first step done: the server-first-message sent, the client-final-message awaited.
#[derive(Debug)]
pub struct Pending {
    mechanism: Mechanism,
    username: String,
    /// `None` for an unknown user: the exchange runs on a stand-in and fails at the proof.
    verifier: Option<Verifier>,
    stand_in: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

/// Answers a client-first-message (`n,,n=user,r=nonce`). `lookup` finds the stored verifier of
/// a user name for this mechanism. Returns the server-first-message to send in AUTH.
pub fn start(
    mechanism: Mechanism,
    client_first: &[u8],
    lookup: impl FnOnce(&str) -> Option<Verifier>,
) -> Result<(Vec<u8>, Pending), Refusal> {
    let text = std::str::from_utf8(client_first).map_err(|_| malformed("client-first-message is not UTF-8"))?;
    // gs2-header: "n" (no channel binding) or "y" (client could but thinks we cannot); no authzid.
    let (gs2_header, bare) = match text.split_once(",,") {
        Some((flag @ ("n" | "y"), bare)) => (format!("{flag},,"), bare),
        Some((flag, _)) if flag.starts_with("p=") => return Err(malformed("channel binding is not supported")),
        _ => return Err(malformed("client-first-message: expected gs2 header n,, (no authorization identity)")),
    };
    let mut fields = bare.split(',');
    let username = fields.next().and_then(|f| f.strip_prefix("n=")).ok_or_else(|| malformed("client-first-message: no n="))?;
    let client_nonce = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or_else(|| malformed("client-first-message: no r="))?;
    if bare.starts_with("m=")
        || username.is_empty()
        || client_nonce.is_empty()
        || !client_nonce.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',')
    {
        return Err(malformed("client-first-message: bad user name or nonce"));
    }
    let username = decode_saslname(username).ok_or_else(|| malformed("client-first-message: bad user name encoding"))?;
    let verifier = lookup(&username).filter(|v| v.mechanism == mechanism);
    let stand_in = stand_in(mechanism, &username);
    let shown = verifier.as_ref().unwrap_or(&stand_in);
    let mut random = [0u8; 18];
    ring::rand::SystemRandom::new().fill(&mut random).map_err(|_| malformed("no randomness"))?;
    let nonce = format!("{client_nonce}{}", B64.encode(random));
    let server_first = format!("r={nonce},s={},i={}", B64.encode(&shown.salt), shown.iterations);
    let pending = Pending { mechanism, username, verifier, stand_in, client_first_bare: bare.to_string(), server_first, nonce, gs2_header };
    Ok((pending.server_first.clone().into_bytes(), pending))
}

impl Pending {
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Checks the client-final-message (`c=…,r=…,p=…`). On success returns the user name and the
    /// server-final-message (`v=…`) the client verifies the server with.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, Vec<u8>), Refusal> {
        let text = std::str::from_utf8(client_final).map_err(|_| malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or_else(|| malformed("client-final-message: no proof"))?;
        let mut fields = without_proof.split(',');
        let binding = fields.next().and_then(|f| f.strip_prefix("c=")).ok_or_else(|| malformed("client-final-message: no c="))?;
        let nonce = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or_else(|| malformed("client-final-message: no r="))?;
        if binding != B64.encode(&self.gs2_header) {
            return Err(malformed("channel binding data does not match the gs2 header"));
        }
        if nonce != self.nonce {
            return Err(Refusal {
                code: ConnectReturnCode::BadUserNamePassword,
                reason: "SCRAM: nonce does not match this exchange (replayed?)".into(),
            });
        }
        let proof = B64.decode(proof).map_err(|_| malformed("proof is not base64"))?;
        let m = self.mechanism;
        let known = self.verifier.is_some();
        let v = self.verifier.as_ref().unwrap_or(&self.stand_in);
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, self.server_first);
        let client_signature = m.hmac(&v.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(bad_proof(&self.username));
        }
        let client_key: Vec<u8> = proof.iter().zip(&client_signature).map(|(p, s)| p ^ s).collect();
        let matches: bool = m.hash(&client_key).ct_eq(&v.stored_key).into();
        if !(matches && known) {
            return Err(bad_proof(&self.username));
        }
        let server_signature = m.hmac(&v.server_key, auth_message.as_bytes());
        Ok((self.username, format!("v={}", B64.encode(server_signature)).into_bytes()))
    }
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is malformed.
fn decode_saslname(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// A verifier for a user name that does not exist, stable per name within this process, so an
/// unknown name looks like a known one (the same salt on every try, the same work; it fails at
/// the proof). Its keys are keyed hashes of the name: no password opens it.
fn stand_in(mechanism: Mechanism, username: &str) -> Verifier {
    static KEY: std::sync::LazyLock<[u8; 32]> = std::sync::LazyLock::new(|| {
        let mut key = [0u8; 32];
        // Without randomness the stand-in salt is predictable, which only reveals that a name is unknown.
        let _ = ring::rand::SystemRandom::new().fill(&mut key);
        key
    });
    let keyed = |label: &str| mechanism.hmac(&*KEY, format!("{label}\0{username}").as_bytes());
    Verifier {
        mechanism,
        iterations: MIN_ITERATIONS,
        salt: keyed("salt")[..16].to_vec(),
        stored_key: keyed("stored"),
        server_key: keyed("server"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 7677 §3: user "user", password "pencil", 4096 iterations, the RFC's nonces and salt.
    #[test]
    fn the_rfc_7677_example_exchange() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = Verifier::derive(Mechanism::Sha256, b"pencil", &salt, 4096);
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let pending = Pending {
            mechanism: Mechanism::Sha256,
            username: "user".into(),
            verifier: Some(verifier.clone()),
            stand_in: verifier,
            client_first_bare: client_first_bare.into(),
            server_first: server_first.into(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            gs2_header: "n,,".into(),
        };
        let client_final = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let (user, server_final) = pending.finish(client_final.as_bytes()).unwrap();
        assert_eq!(user, "user");
        assert_eq!(server_final, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    /// RFC 4013 §3's examples: the stored keys are those of the prepared password.
    #[test]
    fn passwords_are_prepared_with_saslprep() {
        let v = Verifier::generate(Mechanism::Sha256, "I\u{00AD}X\u{00A0}\u{2168}", 4096).unwrap();
        assert_eq!(v, Verifier::derive(Mechanism::Sha256, "IX IX".as_bytes(), &v.salt, 4096));
        assert!(Verifier::generate(Mechanism::Sha256, "a\u{0007}", 4096).unwrap_err().contains("SASLprep"), "prohibited control");
        assert!(Verifier::generate(Mechanism::Sha256, "\u{00AD}", 4096).unwrap_err().contains("empty"), "maps to nothing");
    }

    #[test]
    fn verifiers_round_trip_and_bad_ones_name_the_part() {
        let v = Verifier::generate(Mechanism::Sha512, "s3cret", 4096).unwrap();
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-512$4096:"), "{text}");
        assert_eq!(Verifier::parse(&text).unwrap(), v);
        for (bad, needle) in [
            ("plain", "expected SCRAM-SHA-256$"),
            ("SCRAM-MD5$4096:AA==$AA==:AA==", "unknown mechanism"),
            ("SCRAM-SHA-256$100:AA==$AA==:AA==", "at least 4096"),
            ("SCRAM-SHA-256$4096:AA==$AA==:AA==", "key lengths"),
            ("SCRAM-SHA-256$4096:!!$AA==:AA==", "salt"),
        ] {
            assert!(Verifier::parse(bad).unwrap_err().contains(needle), "{bad}");
        }
        assert!(Verifier::generate(Mechanism::Sha256, "pw", 1000).is_err());
    }

    /// A minimal client, to drive the server through both outcomes (the independent client is
    /// the Python test, `tests/python/scram_client.py`).
    pub(crate) fn client_final(password: &str, client_first_bare: &str, server_first: &str, m: Mechanism) -> String {
        let fields: Vec<&str> = server_first.split(',').collect();
        let nonce = fields[0].strip_prefix("r=").unwrap();
        let salt = B64.decode(fields[1].strip_prefix("s=").unwrap()).unwrap();
        let iterations: u32 = fields[2].strip_prefix("i=").unwrap().parse().unwrap();
        let v = Verifier::derive(m, password.as_bytes(), &salt, iterations);
        let mut salted = vec![0u8; m.len()];
        pbkdf2::derive(m.pbkdf2(), std::num::NonZeroU32::new(iterations).unwrap(), &salt, password.as_bytes(), &mut salted);
        let client_key = m.hmac(&salted, b"Client Key");
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = m.hmac(&v.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    #[test]
    fn wrong_passwords_unknown_users_and_replays_fail() {
        let m = Mechanism::Sha256;
        let stored = Verifier::generate(m, "s3cret", 4096).unwrap();
        let lookup = |u: &str| (u == "app").then(|| stored.clone());
        let exchange = |user: &str, password: &str| {
            let bare = format!("n={user},r=clientnonce");
            let (server_first, pending) = start(m, format!("n,,{bare}").as_bytes(), lookup).unwrap();
            let server_first = String::from_utf8(server_first).unwrap();
            let client_final = client_final(password, &bare, &server_first, m);
            (pending, client_final)
        };
        let (pending, ok) = exchange("app", "s3cret");
        assert_eq!(pending.finish(ok.as_bytes()).unwrap().0, "app");
        let (pending, wrong) = exchange("app", "guess");
        assert_eq!(pending.finish(wrong.as_bytes()).unwrap_err().code, ConnectReturnCode::BadUserNamePassword);
        let (pending, unknown) = exchange("nobody", "s3cret");
        assert_eq!(pending.finish(unknown.as_bytes()).unwrap_err().code, ConnectReturnCode::BadUserNamePassword);
        // A client-final-message replayed into a new exchange carries the old server nonce.
        let (_, replayed) = exchange("app", "s3cret");
        let (fresh, _) = exchange("app", "s3cret");
        assert!(fresh.finish(replayed.as_bytes()).unwrap_err().reason.contains("replayed"));
        // The same salt for an unknown name every time: nothing tells it from a known one.
        let salt_of = |user: &str| {
            let (server_first, _) = start(m, format!("n,,n={user},r=x").as_bytes(), lookup).unwrap();
            String::from_utf8(server_first).unwrap().split(',').nth(1).unwrap().to_string()
        };
        assert_eq!(salt_of("nobody"), salt_of("nobody"));
    }

    #[test]
    fn malformed_first_messages_are_refused() {
        for bad in ["", "n,,", "p=tls-unique,,n=a,r=b", "n,a=admin,n=a,r=b", "n,,r=b", "n,,n=a", "n,,n=a=,r=b"] {
            assert!(start(Mechanism::Sha256, bad.as_bytes(), |_| None).is_err(), "{bad:?}");
        }
        assert_eq!(decode_saslname("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
    }
}
