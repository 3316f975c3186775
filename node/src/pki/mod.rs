//! `rampart pki`: a small certificate authority on disk for a Rampart fleet, built on rcgen.
//!
//! Layout of a PKI folder:
//! ```text
//! ca.pem ca.key                 the CA (refuses to be overwritten)
//! servers/<name>.pem .key        MQTT server certificates (serverAuth)
//! nodes/<id>.pem .key            cluster node certificates (serverAuth + clientAuth, OU rampart-node)
//! admins/<name>.pem .key         admin API client certificates (clientAuth, OU rampart-admin)
//! devices/<id>.pem .key          device client certificates (clientAuth, CN = device id)
//! revoked.toml                   revocations recorded by `revoke`
//! crl.pem                        the CRL written by `crl`
//! ```
//! Private keys are written with mode 0600. Everything verifies with `openssl verify`.

pub mod cli;
pub mod reason;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::auth::serial::format_serial;
use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// What a node certificate's URI name starts with; the node id follows (`urn:rampart:node:2`).
pub const NODE_URI_PREFIX: &str = "urn:rampart:node:";

/// The URI name that binds a node certificate to `node_id`.
pub fn node_uri(node_id: u64) -> String {
    format!("{NODE_URI_PREFIX}{node_id}")
}

/// The node id a certificate is bound to: its one `urn:rampart:node:<id>` URI name (none when it
/// has no such name, or more than one).
pub fn node_id_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<u64> {
    let names = cert.subject_alternative_name().ok()??;
    let mut ids = names.value.general_names.iter().filter_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(NODE_URI_PREFIX),
        _ => None,
    });
    let id = ids.next()?.parse().ok().filter(|&id| id > 0)?;
    ids.next().is_none().then_some(id)
}

/// Organizational unit marking cluster node certificates.
pub const NODE_OU: &str = "rampart-node";
/// Organizational unit marking admin API certificates.
pub const ADMIN_OU: &str = "rampart-admin";

/// The CA's key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKey {
    EcdsaP256,
    /// RSA with this many bits (2048, 3072 or 4096), signing with SHA-256.
    Rsa(usize),
}

impl CaKey {
    fn generate(self) -> anyhow::Result<KeyPair> {
        match self {
            CaKey::EcdsaP256 => Ok(KeyPair::generate()?),
            CaKey::Rsa(bits) => {
                use rsa::pkcs8::EncodePrivateKey;
                if ![2048, 3072, 4096].contains(&bits) {
                    bail!("RSA key size {bits}: use 2048, 3072 or 4096");
                }
                let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits)?;
                let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)?;
                Ok(KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)?)
            }
        }
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Node,
    Admin,
    Device,
}

impl Kind {
    fn folder(self) -> &'static str {
        match self {
            Kind::Server => "servers",
            Kind::Node => "nodes",
            Kind::Admin => "admins",
            Kind::Device => "devices",
        }
    }

    fn usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Kind::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Kind::Node => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Kind::Admin | Kind::Device => vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
    }

    fn unit(self) -> Option<&'static str> {
        match self {
            Kind::Node => Some(NODE_OU),
            Kind::Admin => Some(ADMIN_OU),
            Kind::Server | Kind::Device => None,
        }
    }
}

/// A certificate written to disk.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
    pub sha256_fingerprint: String,
    pub not_after: OffsetDateTime,
    /// An earlier certificate for the same name that this one replaces (moved aside, not revoked).
    pub replaced: Option<PathBuf>,
}

/// One recorded revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Serial as colon-separated upper-case hex, without leading zero bytes.
    pub serial: String,
    pub subject: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
}

/// The revocations recorded in `revoked.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevocationList {
    #[serde(default)]
    pub revoked: Vec<Revocation>,
}

/// A PKI folder.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn revocations_path(&self) -> PathBuf {
        self.dir.join("revoked.toml")
    }

    /// Paths of the certificate and key for `name` of `kind`.
    pub fn paths(&self, kind: Kind, name: &str) -> (PathBuf, PathBuf) {
        let folder = self.dir.join(kind.folder());
        (folder.join(format!("{name}.pem")), folder.join(format!("{name}.key")))
    }

    /// Copies what node `name` needs, and nothing else, to `<dir>/<name>/`: `ca.pem` (the CA
    /// certificate, not its key), `node.pem`/`node.key` and, with `server`, that server
    /// certificate as `server.pem`/`server.key`. Keys keep mode 0600. Returns the folder.
    pub fn write_node_bundle(&self, dir: &Path, name: &str, server: Option<&str>) -> anyhow::Result<PathBuf> {
        let folder = dir.join(name);
        fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
        let copies = std::iter::once((Kind::Node, name, "node")).chain(server.map(|s| (Kind::Server, s, "server")));
        fs::copy(self.ca_cert(), folder.join("ca.pem")).with_context(|| format!("copying {}", self.ca_cert().display()))?;
        for (kind, source, as_name) in copies {
            let (cert, key) = self.paths(kind, source);
            fs::copy(&cert, folder.join(format!("{as_name}.pem"))).with_context(|| format!("copying {}", cert.display()))?;
            let key_pem = fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            write_private(&folder.join(format!("{as_name}.key")), &key_pem)?;
        }
        Ok(folder)
    }

    pub fn has_ca(&self) -> bool {
        self.ca_cert().is_file() && self.ca_key().is_file()
    }

    /// Creates the CA. Refuses to overwrite an existing one.
    pub fn init_ca(&self, common_name: &str, days: u32, key_type: CaKey) -> anyhow::Result<Issued> {
        if self.ca_cert().exists() || self.ca_key().exists() {
            bail!("{} already holds a CA; refusing to overwrite it (move it away first)", self.dir.display());
        }
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let key = key_type.generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        let cert = params.self_signed(&key)?;
        write_private(&self.ca_key(), &key.serialize_pem())?;
        fs::write(self.ca_cert(), cert.pem())?;
        describe(self.ca_cert(), self.ca_key(), cert.der(), None)
    }

    fn issuer(&self) -> anyhow::Result<Issuer<'static, KeyPair>> {
        if !self.has_ca() {
            bail!("{} has no CA: run `rampart pki init-ca --dir {}` first", self.dir.display(), self.dir.display());
        }
        let key = KeyPair::from_pem(&fs::read_to_string(self.ca_key())?).context("reading ca.key")?;
        Issuer::from_ca_cert_pem(&fs::read_to_string(self.ca_cert())?, key).context("reading ca.pem")
    }

    /// Issues a certificate. `name` is the common name (the device id for devices); `sans` are
    /// DNS names or IP addresses (servers and nodes). An existing certificate for the same name
    /// is moved aside as `<name>.<serial>.old.pem` and reported in [`Issued::replaced`].
    pub fn issue(&self, kind: Kind, name: &str, sans: &[String], days: u32) -> anyhow::Result<Issued> {
        if kind == Kind::Node {
            bail!("a node certificate carries its node id: issue it with `issue_node`");
        }
        self.issue_with(kind, name, sans, None, days)
    }

    /// Issues a cluster node certificate for node `node_id`: its id is bound to the certificate
    /// (a `urn:rampart:node:<id>` URI name), which the other nodes check against the id it claims.
    pub fn issue_node(&self, name: &str, node_id: u64, sans: &[String], days: u32) -> anyhow::Result<Issued> {
        if node_id == 0 {
            bail!("node ids start at 1");
        }
        self.issue_with(Kind::Node, name, sans, Some(SanType::URI(node_uri(node_id).try_into()?)), days)
    }

    /// The node id the node certificate `name` is bound to, if it exists and is bound to one.
    pub fn node_id_in(&self, name: &str) -> Option<u64> {
        let der = pem_to_der(&fs::read(self.paths(Kind::Node, name).0).ok()?).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        node_id_of(&cert)
    }

    fn issue_with(&self, kind: Kind, name: &str, sans: &[String], bound_to: Option<SanType>, days: u32) -> anyhow::Result<Issued> {
        check_name(name)?;
        let issuer = self.issuer()?;
        let (cert_path, key_path) = self.paths(kind, name);
        fs::create_dir_all(cert_path.parent().expect("folder"))?;
        let replaced = match fs::read(&cert_path) {
            Ok(old) => {
                let serial = serial_of(&pem_to_der(&old)?)?.replace(':', "");
                let aside = cert_path.with_extension(format!("{serial}.old.pem"));
                fs::rename(&cert_path, &aside)?;
                Some(aside)
            }
            Err(_) => None,
        };
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<anyhow::Result<_>>()?;
        if matches!(kind, Kind::Server | Kind::Node) && params.subject_alt_names.is_empty() {
            params.subject_alt_names.push(SanType::DnsName(name.try_into()?));
        }
        params.subject_alt_names.extend(bound_to);
        params.distinguished_name = self::name(name, kind.unit());
        params.extended_key_usages = kind.usages();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&key_path, &key.serialize_pem())?;
        fs::write(&cert_path, cert.pem())?;
        describe(cert_path, key_path, cert.der(), replaced)
    }

    /// Records the revocation of the certificate in `cert_file` (which must be issued by this CA).
    pub fn revoke(&self, cert_file: &Path, reason: &str) -> anyhow::Result<Revocation> {
        let reason = reason::normalize(reason).map_err(anyhow::Error::msg)?;
        let der = pem_to_der(&fs::read(cert_file).with_context(|| format!("reading {}", cert_file.display()))?)?;
        let ca_der = pem_to_der(&fs::read(self.ca_cert())?)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).context("not an X.509 certificate")?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).context("ca.pem is not an X.509 certificate")?;
        if cert.issuer().as_raw() != ca.subject().as_raw() || cert.verify_signature(Some(ca.public_key())).is_err() {
            bail!("{} (issuer {}) was not signed by this CA ({})", cert_file.display(), cert.issuer(), self.ca_cert().display());
        }
        let mut list = self.revocations()?;
        let serial = serial_of(&der)?;
        if let Some(existing) = list.revoked.iter().find(|r| r.serial == serial) {
            return Ok(existing.clone());
        }
        let revocation =
            Revocation { serial, subject: cert.subject().to_string(), reason: reason.to_string(), revoked_at: OffsetDateTime::now_utc() };
        list.revoked.push(revocation.clone());
        fs::write(self.revocations_path(), toml::to_string(&list)?)?;
        Ok(revocation)
    }

    /// Revocations recorded so far.
    pub fn revocations(&self) -> anyhow::Result<RevocationList> {
        let path = self.revocations_path();
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
            Err(_) => Ok(RevocationList::default()),
        }
    }

    /// Writes `crl.pem`, signed by the CA, listing every recorded revocation, valid for `days`.
    pub fn write_crl(&self, days: u32) -> anyhow::Result<PathBuf> {
        let issuer = self.issuer()?;
        let list = self.revocations()?;
        let now = OffsetDateTime::now_utc();
        let revoked_certs = list
            .revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&hex_serial(&r.serial)?),
                    revocation_time: r.revoked_at,
                    reason_code: Some(reason_code(&r.reason)?),
                    invalidity_date: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(days.into()),
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer)?;
        fs::write(self.crl_path(), crl.pem()?)?;
        Ok(self.crl_path())
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) || name.starts_with('.')
    {
        bail!("{name:?}: names may use letters, digits, '-', '_', '.', '@' (1 to 64, not starting with '.')");
    }
    Ok(())
}

fn name(common_name: &str, unit: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Rampart");
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(value: &str) -> anyhow::Result<SanType> {
    Ok(match value.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(value.try_into().with_context(|| format!("{value:?} is not a DNS name"))?),
    })
}

/// Valid from a few minutes ago (for clocks a little behind) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(CLOCK_SKEW_MINUTES);
    params.not_after = now + Duration::days(days.into());
}

/// How far back a new certificate's validity starts.
const CLOCK_SKEW_MINUTES: i64 = 5;

fn reason_code(reason: &str) -> anyhow::Result<RevocationReason> {
    Ok(match reason::code_of(reason).map_err(anyhow::Error::msg)? {
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        6 => RevocationReason::CertificateHold,
        8 => RevocationReason::RemoveFromCrl,
        9 => RevocationReason::PrivilegeWithdrawn,
        10 => RevocationReason::AaCompromise,
        _ => RevocationReason::Unspecified,
    })
}

/// The DER of the first certificate in a PEM file.
pub fn pem_to_der(pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    Ok(rustls_pki_types::CertificateDer::from_pem_slice(pem).context("no PEM certificate")?.to_vec())
}

/// The serial of a DER certificate as colon-separated upper-case hex without leading zero bytes.
pub fn serial_of(der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("not an X.509 certificate")?;
    Ok(format_serial(cert.raw_serial()))
}

fn hex_serial(serial: &str) -> anyhow::Result<Vec<u8>> {
    serial.split(':').map(|h| u8::from_str_radix(h, 16).with_context(|| format!("bad serial {serial:?}"))).collect()
}

fn describe(cert: PathBuf, key: PathBuf, der: &[u8], replaced: Option<PathBuf>) -> anyhow::Result<Issued> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).context("parsing the new certificate")?;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    Ok(Issued {
        cert,
        key,
        serial: format_serial(parsed.raw_serial()),
        sha256_fingerprint: format_serial(digest.as_ref()),
        not_after: parsed.validity().not_after.to_datetime(),
        replaced,
    })
}

/// Writes a private key readable by the owner only.
fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(pem.as_bytes())
}

/// Files of the development setup used by `serve --dev`.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Device certificates (cert, key) by device id.
    pub devices: Vec<(String, PathBuf, PathBuf)>,
    /// The authorization state: each device may read and write `devices/<its id>/#`.
    pub auth_state: PathBuf,
    pub admin: (PathBuf, PathBuf),
    /// Cluster node certificates (cert, key), for `node-1` … `node-N`.
    pub nodes: Vec<(PathBuf, PathBuf)>,
}

/// Device ids of the development setup.
pub const DEV_DEVICES: [&str; 2] = ["device-1", "device-2"];

/// The development rules: every certificate of the development CA gets `devices/<identity>/#`.
const DEV_AUTH_STATE: &str = r#"# Development authorization state (see docs/security.md).
# Every certificate of the development CA may read and write devices/<its identity>/# only;
# anonymous clients (plain TCP on 127.0.0.1:1883) may use demo/# for quick experiments.
[defaults]
unknown_certificate = "default_rules"
rules = [{ access = "readWrite", pattern = "devices/%u/#" }]
anonymous = true
anonymous_rules = [{ access = "readWrite", pattern = "demo/#" }]
"#;

/// Creates what is missing of the development setup under `dir`: a CA, a `localhost` server
/// certificate, certificates for `device-1`, `device-2` and `admin`, node certificates
/// `node-1` … `node-<nodes>` for 127.0.0.1, and the development authorization state. Existing
/// files are kept.
pub fn ensure_dev_pki(dir: &Path, nodes: usize) -> anyhow::Result<DevPki> {
    let store = Store::new(dir);
    if !store.has_ca() {
        store.init_ca("Rampart Development CA", 3650, CaKey::EcdsaP256)?;
    }
    let wanted = [
        (Kind::Server, "localhost".to_string(), vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]),
        (Kind::Admin, "admin".into(), vec![]),
    ]
    .into_iter()
    .chain(DEV_DEVICES.iter().map(|d| (Kind::Device, d.to_string(), vec![])));
    for (kind, name, sans) in wanted {
        let name = name.as_str();
        let (cert, key) = store.paths(kind, name);
        if !cert.is_file() || !key.is_file() {
            store.issue(kind, name, &sans, 825)?;
        }
    }
    for n in 1..=nodes as u64 {
        let name = format!("node-{n}");
        // A node certificate from before node ids were bound to certificates is replaced.
        if !store.paths(Kind::Node, &name).1.is_file() || store.node_id_in(&name) != Some(n) {
            store.issue_node(&name, n, &["localhost".into(), "127.0.0.1".into()], 825)?;
        }
    }
    let auth_state = dir.join("auth.toml");
    if !auth_state.is_file() {
        fs::write(&auth_state, DEV_AUTH_STATE)?;
    }
    let (server_cert, server_key) = store.paths(Kind::Server, "localhost");
    let devices = DEV_DEVICES
        .iter()
        .map(|d| {
            let (cert, key) = store.paths(Kind::Device, d);
            (d.to_string(), cert, key)
        })
        .collect();
    let nodes = (1..=nodes).map(|n| store.paths(Kind::Node, &format!("node-{n}"))).collect();
    Ok(DevPki { ca_cert: store.ca_cert(), server_cert, server_key, devices, auth_state, admin: store.paths(Kind::Admin, "admin"), nodes })
}
