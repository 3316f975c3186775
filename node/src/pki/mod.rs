//! Certificates for development mode: a local CA and a server certificate for `localhost`,
//! created once under a folder and reused on later starts. Built on rcgen.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Files of the development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Creates what is missing of the development PKI under `dir` and returns its files.
pub fn ensure_dev_pki(dir: &Path) -> anyhow::Result<DevPki> {
    fs::create_dir_all(dir)?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let pki = DevPki { ca_cert: ca_cert.clone(), server_cert: dir.join("server.pem"), server_key: dir.join("server.key") };
    if !ca_cert.exists() || !ca_key.exists() {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name("Rampart Development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        write_private(&ca_key, &key.serialize_pem())?;
        fs::write(&ca_cert, cert.pem())?;
        let _ = fs::remove_file(&pki.server_cert);
    }
    if !pki.server_cert.exists() || !pki.server_key.exists() {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(&ca_key)?)?;
        let issuer = Issuer::from_ca_cert_pem(&fs::read_to_string(&ca_cert)?, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])?;
        params.distinguished_name = name("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&pki.server_key, &key.serialize_pem())?;
        fs::write(&pki.server_cert, cert.pem())?;
    }
    Ok(pki)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes a private key readable by the owner only.
fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(pem.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_is_created_once_and_loads() {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_pki(dir.path()).unwrap();
        let ca = fs::read(&first.ca_cert).unwrap();
        let second = ensure_dev_pki(dir.path()).unwrap();
        assert_eq!(fs::read(&second.ca_cert).unwrap(), ca);
        crate::tls::server_config(&second.server_cert, &second.server_key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&second.server_key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
