//! Who is calling a gRPC service: the verified client certificate of the TLS connection, which
//! must carry the organizational unit of the role the service requires (`rampart-node` on the
//! cluster port, `rampart-admin` on the admin port) and must not be revoked.

use tonic::Status;

use crate::auth::identity::PeerCertificate;
use crate::auth::store::AuthStore;

/// Why a peer's certificate does not pass [`check_certificate`].
#[derive(Debug, thiserror::Error)]
pub enum CertificateRefused {
    #[error("unparsable certificate")]
    Unparsable,
    #[error("certificate {name:?} ({subject}) is not a {role_ou} certificate")]
    WrongRole { name: String, subject: String, role_ou: String },
    #[error("certificate {serial} of {issuer} is revoked")]
    Revoked { serial: String, issuer: String },
}

/// The common name of a verified peer certificate (DER) that carries the organizational unit
/// `role_ou` and is not revoked (in the replicated state or a CRL).
pub fn check_certificate(der: &[u8], role_ou: &str, auth: &AuthStore) -> Result<String, CertificateRefused> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| CertificateRefused::Unparsable)?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or_default().to_string();
    if !subject.iter_organizational_unit().any(|unit| unit.as_str() == Ok(role_ou)) {
        return Err(CertificateRefused::WrongRole { name, subject: subject.to_string(), role_ou: role_ou.into() });
    }
    let peer = PeerCertificate {
        identity: name.clone(),
        serial: crate::auth::serial::format_serial(cert.raw_serial()),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    if auth.is_revoked(&peer) {
        return Err(CertificateRefused::Revoked { serial: peer.serial, issuer: peer.issuer });
    }
    Ok(name)
}

/// The caller's common name, or the gRPC status to refuse it with: Unauthenticated without a
/// certificate, PermissionDenied for another role's certificate or a revoked one.
pub fn authorize<T>(request: &tonic::Request<T>, role_ou: &str, auth: &AuthStore) -> Result<String, Status> {
    let certs = request
        .peer_certs()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Status::unauthenticated(format!("a client certificate is required (OU {role_ou}, from `rampart pki`)")))?;
    check_certificate(&certs[0], role_ou, auth).map_err(|e| match e {
        CertificateRefused::Unparsable => Status::unauthenticated(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    })
}
