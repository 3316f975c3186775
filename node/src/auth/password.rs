//! Password hashing for password credentials: argon2id in the PHC string format, as printed by
//! `rampart passwd` and stored in the authorization state. Verification costs milliseconds of
//! CPU by design, so callers run it off the async threads. Every stored hash has the same
//! parameters (those `rampart passwd` writes): a hash cannot make a CONNECT cost more memory or
//! time than any other, and an unknown user name costs as much as a known one.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};

/// The longest hash output accepted, in bytes (argon2's default is 32).
const MAX_OUTPUT_BYTES: usize = 64;

/// An argon2id hash of `password` with a random salt.
pub fn hash(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `hash` is a well-formed argon2id PHC string with the parameters `rampart passwd`
/// writes (argon2's defaults: m = 19456 KiB, t = 2, p = 1).
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash: {e}"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!("hash algorithm {} is not argon2id", parsed.algorithm));
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("argon2id parameters: {e}"))?;
    let (wanted, got) = (Params::default(), (params.m_cost(), params.t_cost(), params.p_cost()));
    if got != (wanted.m_cost(), wanted.t_cost(), wanted.p_cost()) {
        return Err(format!(
            "argon2id parameters m={},t={},p={} differ from the broker's m={},t={},p={}: hash the password with `rampart passwd`",
            got.0,
            got.1,
            got.2,
            wanted.m_cost(),
            wanted.t_cost(),
            wanted.p_cost()
        ));
    }
    if parsed.hash.is_some_and(|output| output.len() > MAX_OUTPUT_BYTES) {
        return Err(format!("argon2id output longer than {MAX_OUTPUT_BYTES} bytes"));
    }
    Ok(())
}

/// Whether `password` matches `hash`.
pub fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(check_hash(&h).is_ok());
        assert!(verify("s3cret", &h));
        assert!(!verify("wrong", &h));
        assert!(!verify("s3cret", "garbage"));
        assert!(check_hash("$2b$10$abcdefghijklmnopqrstuv").is_err());
    }

    #[test]
    fn a_hash_with_other_costs_is_refused() {
        // What an attacker with write access to one credential would store: 4 GiB per check.
        let costly = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXphYmNkZWY";
        let err = check_hash(costly).unwrap_err();
        assert!(err.contains("m=4194304,t=1,p=1 differ from the broker's m=19456,t=2,p=1"), "{err}");
        let cheap = "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXphYmNkZWY";
        assert!(check_hash(cheap).is_err(), "a cheaper hash would tell known user names by their timing");
    }
}
