//! Who is calling a gRPC service: the verified client certificate of the TLS connection, which
//! must carry the organizational unit of the role the service requires (`rampart-node` on the
//! cluster port, `rampart-admin` on the admin port) and must not be revoked.

use tonic::Status;

use crate::auth::identity::PeerCertificate;
use crate::auth::store::AuthStore;

/// The caller's common name, or the gRPC status to refuse it with: Unauthenticated without a
/// certificate, PermissionDenied for another role's certificate or a revoked one.
pub fn authorize<T>(request: &tonic::Request<T>, role_ou: &str, auth: &AuthStore) -> Result<String, Status> {
    let certs = request
        .peer_certs()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Status::unauthenticated(format!("a client certificate is required (OU {role_ou}, from `rampart pki`)")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).map_err(|_| Status::unauthenticated("unparsable client certificate"))?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or_default().to_string();
    if !subject.iter_organizational_unit().any(|unit| unit.as_str() == Ok(role_ou)) {
        return Err(Status::permission_denied(format!("certificate {name:?} ({subject}) is not a {role_ou} certificate")));
    }
    let peer = PeerCertificate {
        identity: name.clone(),
        serial: crate::auth::serial::format_serial(cert.raw_serial()),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    if auth.current().revocation_of(&peer).is_some() {
        return Err(Status::permission_denied(format!("certificate {} of {} is revoked", peer.serial, peer.issuer)));
    }
    Ok(name)
}
