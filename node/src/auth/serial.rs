//! Certificate serial numbers as operators read and type them (`AB:CD:...`): the one spelling
//! used by identities, revocations, CRLs and `rampart pki`.

/// Formats serial bytes as `AB:CD:...`, leading zero bytes removed.
pub fn format_serial(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A serial typed by an operator (`0a:1b`, `0A1B`, `00:0A:1B`) in the form of [`format_serial`].
pub fn normalize_serial(text: &str) -> Result<String, String> {
    let digits: String = text.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("serial {text:?} is not hexadecimal"));
    }
    let padded = if digits.len() % 2 == 1 { format!("0{digits}") } else { digits };
    let bytes: Vec<u8> = (0..padded.len()).step_by(2).map(|i| u8::from_str_radix(&padded[i..i + 2], 16).unwrap_or_default()).collect();
    Ok(format_serial(&bytes))
}
