//! rustls server configuration for the TLS and WSS listeners, built from PEM files: the server
//! certificate, and for mutual TLS a client verifier with the CA bundle and CRLs that also
//! refuses revoked certificates; and the caller check of the gRPC services.

pub mod caller;
pub mod revocation;

use std::path::Path;
use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::auth::store::AuthStore;
use crate::config::{ClientAuth, TlsFiles};

/// A TLS setup problem, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, format!("no usable private key: {e}")))
}

/// Reads a CRL, PEM or DER.
pub fn load_crl(path: &Path) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    match CertificateRevocationListDer::from_pem_slice(&bytes) {
        Ok(crl) => Ok(crl),
        Err(_) if x509_parser::parse_x509_crl(&bytes).is_ok() => Ok(CertificateRevocationListDer::from(bytes)),
        Err(e) => Err(file_error(path, format!("not a PEM or DER CRL: {e}"))),
    }
}

/// Every (issuer DN, serial) revoked by the given CRL files, for re-checking live connections.
pub fn crl_revocations<'a>(
    paths: impl IntoIterator<Item = &'a std::path::PathBuf>,
) -> Result<std::collections::HashSet<(String, String)>, TlsError> {
    let mut revoked = std::collections::HashSet::new();
    for path in paths {
        let der = load_crl(path)?;
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| file_error(path, e))?;
        let issuer = crl.issuer().to_string();
        revoked.extend(crl.iter_revoked_certificates().map(|r| (issuer.clone(), crate::auth::serial::format_serial(r.raw_serial()))));
    }
    Ok(revoked)
}

/// TLS 1.2 and 1.3 with the listener's certificate; with `client_auth`, clients are verified
/// against its CA bundle and CRLs, and refused in the handshake when `auth` holds them revoked.
pub fn server_config(files: &TlsFiles, auth: &Arc<AuthStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let builder = ServerConfig::builder();
    let config = match &files.client_auth {
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
        Some(client_auth) => {
            let verifier = revocation::RevocationVerifier::new(webpki_verifier(client_auth)?, auth.clone(), client_auth.identity.clone());
            let mut config = builder.with_client_cert_verifier(Arc::new(verifier)).with_single_cert(certs, key)?;
            // A resumed session is not verified again: a certificate revoked since would get back in.
            config.session_storage = Arc::new(NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
            config
        }
    };
    Ok(Arc::new(config))
}

fn webpki_verifier(auth: &ClientAuth) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&auth.ca_file)? {
        roots.add(cert).map_err(|e| file_error(&auth.ca_file, e))?;
    }
    let crls = auth.crl_files.iter().map(|path| load_crl(path)).collect::<Result<Vec<_>, _>>()?;
    let mut builder = WebPkiClientVerifier::builder(Arc::new(roots)).with_crls(crls);
    if !auth.crl_files.is_empty() {
        // CRLs come from the issuing CAs; a CA in the bundle without a CRL is not an error.
        builder = builder.only_check_end_entity_revocation().allow_unknown_revocation_status();
    }
    if !auth.required {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| TlsError::Verifier(e.to_string()))
}

/// The TLS of a gRPC port (cluster or admin): its certificate and key, and the CA bundle client
/// certificates must chain to; with `client_optional`, clients without one get through the
/// handshake (and are refused per call, with a reason).
pub fn grpc_server_tls(cert: &Path, key: &Path, ca: &Path, client_optional: bool) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &Path| std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .client_ca_root(Certificate::from_pem(read(ca)?))
        .client_auth_optional(client_optional)
        .timeout(std::time::Duration::from_secs(10)))
}

/// Installs the process-wide rustls crypto provider (ring). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
