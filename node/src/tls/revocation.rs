//! Revocation inside the TLS handshake: the client certificate verifier of the mutual-TLS
//! listeners (MQTT over TLS, WSS) runs rustls' WebPKI verifier (chain, validity, key usage, the
//! listener's CRL files), then asks the node's [`AuthStore`] whether the certificate is revoked —
//! the decision CONNECT and live connections apply, read from the snapshot in force — so a
//! revoked device fails the handshake with the alert `certificate_revoked` and costs no session.
//! What was refused is handed to the listener's accept task, which logs it with the peer.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::auth::identity::{IdentityRule, PeerCertificate};
use crate::auth::store::{AuthStore, Revoked, RevokedBy};

/// A handshake refused because the client certificate is revoked: who presented it and the rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedRevoked {
    pub identity: String,
    pub revoked: Revoked,
}

tokio::task_local! {
    /// The revocation refusal of the handshake running in this task, if any.
    static REFUSED: RefCell<Option<RefusedRevoked>>;
}

/// Runs a TLS handshake; also returns the revocation it was refused for, if it was.
pub async fn watch<F: Future>(handshake: F) -> (F::Output, Option<RefusedRevoked>) {
    REFUSED
        .scope(RefCell::new(None), async {
            let output = handshake.await;
            (output, REFUSED.with(|refused| refused.borrow_mut().take()))
        })
        .await
}

/// Wraps the WebPKI verifier of a listener; the identity rule is the listener's, so identity
/// regex revocations match what CONNECT sees.
pub struct RevocationVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    auth: Arc<AuthStore>,
    identity: IdentityRule,
}

impl std::fmt::Debug for RevocationVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationVerifier").field("inner", &self.inner).field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl RevocationVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, auth: Arc<AuthStore>, identity: IdentityRule) -> RevocationVerifier {
        RevocationVerifier { inner, auth, identity }
    }

    /// The revocation covering a chain-verified certificate. A certificate without a usable
    /// identity is left to CONNECT, which refuses it naming the identity problem.
    fn revocation(&self, end_entity: &CertificateDer<'_>) -> Option<RefusedRevoked> {
        let cert = self.identity.extract(end_entity).ok()?;
        let revoked = self.auth.revocation(&cert)?;
        Some(RefusedRevoked { identity: cert.identity, revoked })
    }

    fn refuse(refused: Option<RefusedRevoked>) -> Error {
        crate::telemetry::metrics::tls_handshake_revoked();
        if let Some(refused) = refused {
            let _ = REFUSED.try_with(|slot| *slot.borrow_mut() = Some(refused));
        }
        Error::InvalidCertificate(CertificateError::Revoked)
    }
}

impl ClientCertVerifier for RevocationVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(verified) => match self.revocation(end_entity) {
                None => Ok(verified),
                refused => Err(Self::refuse(refused)),
            },
            // Listed in one of the listener's CRL files (checked after the chain, so the
            // certificate is genuine).
            Err(Error::InvalidCertificate(CertificateError::Revoked)) => {
                let cert = self.identity.extract(end_entity).ok();
                let refused = cert.map(|PeerCertificate { identity, serial, issuer, .. }| RefusedRevoked {
                    identity,
                    revoked: Revoked { serial, issuer, by: RevokedBy::CrlFile },
                });
                Err(Self::refuse(refused))
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}
