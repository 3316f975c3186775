//! Revocation reasons: one vocabulary, the RFC 5280 CRLReason names (`keyCompromise`,
//! `superseded`, …), for `rampart pki revoke`, `rampart admin revoke` and the entries of an
//! imported CRL.

/// The RFC 5280 names with their reason codes (7 is unused).
pub const REASONS: [(&str, u8); 10] = [
    ("unspecified", 0),
    ("keyCompromise", 1),
    ("cACompromise", 2),
    ("affiliationChanged", 3),
    ("superseded", 4),
    ("cessationOfOperation", 5),
    ("certificateHold", 6),
    ("removeFromCRL", 8),
    ("privilegeWithdrawn", 9),
    ("aACompromise", 10),
];

/// The RFC 5280 name for `text` (matched case-insensitively; empty means `unspecified`), or an
/// error that lists the names.
pub fn normalize(text: &str) -> Result<&'static str, String> {
    if text.is_empty() {
        return Ok("unspecified");
    }
    REASONS.iter().find(|(name, _)| name.eq_ignore_ascii_case(text)).map(|(name, _)| *name).ok_or_else(|| {
        let names: Vec<&str> = REASONS.iter().map(|(name, _)| *name).collect();
        format!("unknown revocation reason {text:?}; use one of the RFC 5280 names: {}", names.join(", "))
    })
}

/// The RFC 5280 name of a reason code, as found in a CRL entry.
pub fn name_of_code(code: u8) -> Option<&'static str> {
    REASONS.iter().find(|(_, c)| *c == code).map(|(name, _)| *name)
}

/// The reason code of an RFC 5280 name (as [`normalize`] accepts it).
pub fn code_of(text: &str) -> Result<u8, String> {
    let name = normalize(text)?;
    Ok(REASONS.iter().find(|(n, _)| *n == name).map_or(0, |(_, code)| *code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_rfc_5280_and_case_insensitive() {
        assert_eq!(normalize("KeyCompromise"), Ok("keyCompromise"));
        assert_eq!(normalize(""), Ok("unspecified"));
        assert_eq!(code_of("removeFromCRL"), Ok(8));
        assert_eq!(name_of_code(1), Some("keyCompromise"));
        assert_eq!(name_of_code(7), None);
        let err = normalize("lost").unwrap_err();
        assert!(err.contains("keyCompromise") && err.contains("cessationOfOperation"), "{err}");
    }
}
