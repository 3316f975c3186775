//! Client connections for the load generator: plain TCP, TLS, or TLS with a client certificate
//! picked from a directory, all with TCP_NODELAY.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// A byte stream to a broker.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How to reach the broker.
#[derive(Clone)]
pub struct Connector {
    pub addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// A client certificate and key file pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every `NAME.pem` in `dir` that has a matching `NAME.key`, sorted by name.
pub fn identities(dir: &Path) -> anyhow::Result<Vec<Identity>> {
    let mut found: Vec<Identity> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .map(|cert| Identity { key: cert.with_extension("key"), cert })
        .filter(|id| id.key.is_file())
        .collect();
    found.sort_by(|a, b| a.cert.cmp(&b.cert));
    if found.is_empty() {
        bail!("{}: no NAME.pem with a matching NAME.key", dir.display());
    }
    Ok(found)
}

impl Connector {
    pub fn tcp(addr: String) -> Connector {
        Connector { addr, tls: None }
    }

    /// TLS towards `server_name`, trusting `ca`; with `identity` for mutual TLS.
    pub fn tls(addr: String, ca: &Path, server_name: &str, identity: Option<&Identity>) -> anyhow::Result<Connector> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
            roots.add(cert?)?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match identity {
            Some(id) => {
                let chain = CertificateDer::pem_file_iter(&id.cert)?.collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_file(&id.key).with_context(|| format!("reading {}", id.key.display()))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from(server_name.to_string())?;
        Ok(Connector { addr, tls: Some((TlsConnector::from(Arc::new(config)), name)) })
    }

    pub async fn connect(&self) -> anyhow::Result<Box<dyn Stream>> {
        self.connect_from(None).await
    }

    /// Connects from `source` (any port of it), or from wherever the system picks: many source
    /// addresses (127.0.0.x) give a loopback run more than one address's ephemeral ports.
    pub async fn connect_from(&self, source: Option<IpAddr>) -> anyhow::Result<Box<dyn Stream>> {
        let connecting = async {
            let Some(source) = source else { return TcpStream::connect(&self.addr).await };
            let to = tokio::net::lookup_host(&self.addr).await?.next().ok_or(std::io::ErrorKind::NotFound)?;
            let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(to).await
        };
        let tcp = connecting.await.with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.with_context(|| format!("TLS handshake with {}", self.addr))?;
                Ok(Box::new(tls))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_pair_pem_and_key() {
        let dir = std::env::temp_dir().join(format!("loadgen-ids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["b.pem", "b.key", "a.pem", "a.key", "ca.pem", "notes.txt"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let names: Vec<String> =
            identities(&dir).unwrap().iter().map(|i| i.cert.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a.pem", "b.pem"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(identities(&dir).is_err());
    }
}
