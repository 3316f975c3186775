//! Who is calling a gRPC service: the verified client certificate of the TLS connection, which
//! must carry the organizational unit of the role the service requires (`rampart-node` on the
//! cluster port, `rampart-admin` on the admin port) and must not be revoked.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
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
    #[error("{0}")]
    Revoked(Box<crate::auth::store::Revoked>),
    #[error("node certificate {name:?} is bound to no node id (one URI name urn:rampart:node:<id>; reissue it with `rampart pki issue-node --node-id`)")]
    NoNodeId { name: String },
}

/// A verified node certificate: its common name and the node id it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertificate {
    pub name: String,
    pub node_id: u64,
}

/// The common name of a verified peer certificate (DER) that carries the organizational unit
/// `role_ou` and is not revoked (in the replicated state or a CRL).
pub fn check_certificate(der: &[u8], role_ou: &str, auth: &AuthStore) -> Result<String, CertificateRefused> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| CertificateRefused::Unparsable)?;
    check_parsed(&cert, role_ou, auth)
}

/// A verified peer certificate (DER) that is a node certificate ([`crate::pki::NODE_OU`]), not
/// revoked and bound to a node id.
pub fn check_node(der: &[u8], auth: &AuthStore) -> Result<NodeCertificate, CertificateRefused> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| CertificateRefused::Unparsable)?;
    let name = check_parsed(&cert, crate::pki::NODE_OU, auth)?;
    match crate::pki::node_id_of(&cert) {
        Some(node_id) => Ok(NodeCertificate { name, node_id }),
        None => Err(CertificateRefused::NoNodeId { name }),
    }
}

fn check_parsed(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    role_ou: &str,
    auth: &AuthStore,
) -> Result<String, CertificateRefused> {
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
    if let Some(revoked) = auth.revocation(&peer) {
        return Err(CertificateRefused::Revoked(Box::new(revoked)));
    }
    Ok(name)
}

/// The caller's common name, or the gRPC status to refuse it with: Unauthenticated without a
/// certificate, PermissionDenied for another role's certificate or a revoked one.
pub fn authorize<T>(request: &tonic::Request<T>, role_ou: &str, auth: &AuthStore) -> Result<String, Status> {
    check_certificate(&chain(request, role_ou)?[0], role_ou, auth).map_err(status)
}

/// The calling node, or the gRPC status to refuse it with (as [`authorize`]).
pub fn authorize_node<T>(request: &tonic::Request<T>, auth: &AuthStore) -> Result<NodeCertificate, Status> {
    check_node(&chain(request, crate::pki::NODE_OU)?[0], auth).map_err(status)
}

/// The caller's certificate chain (not empty).
fn chain<T>(request: &tonic::Request<T>, role_ou: &str) -> Result<Arc<Vec<CertificateDer<'static>>>, Status> {
    (request.peer_certs().filter(|c| !c.is_empty()))
        .ok_or_else(|| Status::unauthenticated(format!("a client certificate is required (OU {role_ou}, from `rampart pki`)")))
}

fn status(e: CertificateRefused) -> Status {
    match e {
        CertificateRefused::Unparsable => Status::unauthenticated(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    }
}
