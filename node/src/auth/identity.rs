//! The identity of a client certificate: which field it comes from (subject CN, SAN DNS, SAN URI
//! such as a SPIFFE ID, SAN email), an optional regex with a named group `id` that extracts it,
//! and the checks that keep it from widening a topic permission. Pure: DER in, identity out.

use regex::Regex;
use serde::Deserialize;
use x509_parser::extensions::GeneralName;

/// Certificate field an identity is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first SAN DNS name (that matches the pattern, when one is set).
    SanDns,
    /// The first SAN URI, e.g. `spiffe://fleet.example/device/0042`.
    SanUri,
    /// The first SAN email address.
    SanEmail,
}

impl std::fmt::Display for IdentitySource {
    /// The spelling of `identity_source` in the config file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdentitySource::Cn => "cn",
            IdentitySource::SanDns => "san_dns",
            IdentitySource::SanUri => "san_uri",
            IdentitySource::SanEmail => "san_email",
        })
    }
}

/// How a listener turns a client certificate into an identity.
#[derive(Debug, Clone, Default)]
pub struct IdentityRule {
    pub source: IdentitySource,
    /// Must contain a named group `id`; the identity is what it captures.
    pub pattern: Option<Regex>,
}

/// What the broker knows of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub identity: String,
    /// Serial as colon-separated upper-case hex without leading zero bytes.
    pub serial: String,
    /// Issuer distinguished name, e.g. `O=Rampart, CN=Plant 7 CA`.
    pub issuer: String,
    /// Start of validity (when it was issued), seconds since the Unix epoch.
    pub not_before: i64,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate has no {0} field to take the identity from")]
    Missing(IdentitySource),
    #[error("no {0} value of the certificate matches the identity pattern")]
    NoMatch(IdentitySource),
    #[error("identity {0:?} contains '+', '#', '/' or NUL, which could widen topic permissions")]
    Forbidden(String),
}

impl IdentityRule {
    /// Checks that a pattern has the `id` group; used when the configuration is read.
    pub fn new(source: IdentitySource, pattern: Option<&str>) -> Result<IdentityRule, String> {
        let pattern = pattern.map(Regex::new).transpose().map_err(|e| e.to_string())?;
        if pattern.as_ref().is_some_and(|p| !p.capture_names().flatten().any(|n| n == "id")) {
            return Err("the identity pattern needs a named group (?P<id>...)".into());
        }
        Ok(IdentityRule { source, pattern })
    }

    /// The identity of a DER certificate.
    pub fn extract(&self, der: &[u8]) -> Result<PeerCertificate, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let candidates: Vec<String> = match self.source {
            IdentitySource::Cn => cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect(),
            source => {
                let san = cert.subject_alternative_name().map_err(|e| IdentityError::Unparsable(e.to_string()))?;
                san.map(|ext| {
                    ext.value
                        .general_names
                        .iter()
                        .filter_map(|name| match (source, name) {
                            (IdentitySource::SanDns, GeneralName::DNSName(v))
                            | (IdentitySource::SanUri, GeneralName::URI(v))
                            | (IdentitySource::SanEmail, GeneralName::RFC822Name(v)) => Some(v.to_string()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
            }
        };
        if candidates.is_empty() {
            return Err(IdentityError::Missing(self.source));
        }
        let identity = match &self.pattern {
            None => candidates.into_iter().next(),
            Some(pattern) => candidates.iter().find_map(|c| pattern.captures(c).and_then(|m| m.name("id")).map(|m| m.as_str().to_string())),
        }
        .ok_or(IdentityError::NoMatch(self.source))?;
        if identity.is_empty() || identity.contains(['+', '#', '/', '\0']) {
            return Err(IdentityError::Forbidden(identity));
        }
        Ok(PeerCertificate {
            identity,
            serial: crate::auth::serial::format_serial(cert.raw_serial()),
            issuer: cert.issuer().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: &str, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_is_the_default() {
        let id = IdentityRule::default().extract(&cert("plc-7", vec![])).unwrap();
        assert_eq!(id.identity, "plc-7");
        assert!(!id.serial.is_empty());
        assert!(id.issuer.contains("plc-7"));
    }

    #[test]
    fn san_sources_and_patterns() {
        let der = cert(
            "ignored",
            vec![
                SanType::DnsName("gw-1.plant7.example".try_into().unwrap()),
                SanType::URI("spiffe://fleet.example/device/0042".try_into().unwrap()),
                SanType::Rfc822Name("ops@plant7.example".try_into().unwrap()),
            ],
        );
        let rule = |source, pattern| IdentityRule::new(source, pattern).unwrap();
        assert_eq!(rule(IdentitySource::SanDns, None).extract(&der).unwrap().identity, "gw-1.plant7.example");
        assert_eq!(rule(IdentitySource::SanEmail, None).extract(&der).unwrap().identity, "ops@plant7.example");
        let spiffe = rule(IdentitySource::SanUri, Some("^spiffe://fleet\\.example/device/(?P<id>[0-9]+)$"));
        assert_eq!(spiffe.extract(&der).unwrap().identity, "0042");
        let plant = rule(IdentitySource::Cn, Some("^plant-(?P<id>.+)$"));
        assert_eq!(plant.extract(&der), Err(IdentityError::NoMatch(IdentitySource::Cn)));
        assert_eq!(rule(IdentitySource::SanDns, None).extract(&cert("x", vec![])), Err(IdentityError::Missing(IdentitySource::SanDns)));
    }

    #[test]
    fn identities_that_could_widen_an_acl_are_refused() {
        for cn in ["plc/7", "plc+", "#", "a\0b"] {
            assert!(matches!(IdentityRule::default().extract(&cert(cn, vec![])), Err(IdentityError::Forbidden(_))), "{cn:?}");
        }
        let uri = cert("x", vec![SanType::URI("spiffe://fleet.example/device/a/b".try_into().unwrap())]);
        let rule = IdentityRule::new(IdentitySource::SanUri, Some("^spiffe://fleet\\.example/device/(?P<id>.+)$")).unwrap();
        assert_eq!(rule.extract(&uri), Err(IdentityError::Forbidden("a/b".into())));
    }

    #[test]
    fn patterns_need_the_id_group() {
        assert!(IdentityRule::new(IdentitySource::Cn, Some("^plant-(.+)$")).is_err());
        assert!(IdentityRule::new(IdentitySource::Cn, Some("(")).is_err());
    }
}
