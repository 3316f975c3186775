//! The `http` provider: delegates a CONNECT decision to the operator's HTTP(S) endpoint (fleet
//! setting `[providers.http]`), only to hosts this node's config allows (`[auth.http]`), with a
//! timeout, a bounded cache of decisions with a TTL, and the configured behaviour when the
//! endpoint is down or answers garbage. Owns the request and response JSON and the client (hyper
//! over tokio, rustls with ring for https).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use super::identity::PeerCertificate;
use super::state::{ClientType, HttpSettings, Rule};

/// Largest response body read from the endpoint.
const MAX_RESPONSE: usize = 64 * 1024;

/// This node's limits on delegation (`[auth.http]` in the config file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpNodeConfig {
    /// Hosts (`name` or `name:port`) the endpoint URL may name; none: delegation is refused.
    pub allowed_hosts: Vec<String>,
    /// CA bundle (PEM) that verifies https endpoints; required for https.
    pub ca_file: Option<PathBuf>,
}

/// What the broker sends (JSON, POST).
#[derive(Debug, Serialize)]
pub struct HttpQuery<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub certificate: Option<CertificateQuery<'a>>,
    /// `tcp`, `tls`, `ws` or `wss`.
    pub listener: &'a str,
    pub peer: Option<IpAddr>,
}

#[derive(Debug, Serialize)]
pub struct CertificateQuery<'a> {
    pub identity: &'a str,
    pub issuer: &'a str,
    pub serial: &'a str,
}

impl<'a> CertificateQuery<'a> {
    pub fn of(cert: &'a PeerCertificate) -> CertificateQuery<'a> {
        CertificateQuery { identity: &cert.identity, issuer: &cert.issuer, serial: &cert.serial }
    }
}

/// What the endpoint answers (HTTP 200, JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    /// `allow` or `deny`.
    result: String,
    /// Who the client is (session owner and `%u`); default: the user name, else the client id.
    principal: Option<String>,
    client_type: Option<ClientType>,
    rules: Option<Vec<Rule>>,
    /// Why, for the broker's log.
    reason: Option<String>,
}

/// An allowed client, as the endpoint described it.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpGrant {
    pub principal: String,
    pub client_type: Option<ClientType>,
    pub rules: Option<Vec<Rule>>,
}

/// The endpoint's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow(Arc<HttpGrant>),
    Deny(String),
    /// No decision: down, slow, an error status or an unreadable answer.
    Unavailable(String),
}

/// The node's delegation client and its decision cache.
pub struct HttpDelegate {
    config: HttpNodeConfig,
    tls: Option<tokio_rustls::TlsConnector>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], (Instant, Decision)>,
    order: VecDeque<[u8; 32]>,
}

/// The byte streams requests go over (TCP, or TLS over TCP).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl HttpDelegate {
    /// Errors name the config key.
    pub fn new(config: &HttpNodeConfig) -> anyhow::Result<HttpDelegate> {
        let tls = match &config.ca_file {
            None => None,
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| anyhow::anyhow!("auth.http.ca_file: {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| anyhow::anyhow!("auth.http.ca_file: {}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| anyhow::anyhow!("auth.http.ca_file: {}: {e}", path.display()))?;
                }
                let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(client)))
            }
        };
        Ok(HttpDelegate { config: config.clone(), tls, cache: Mutex::default() })
    }

    /// Asks the endpoint (or the cache) about a CONNECT.
    pub async fn decide(&self, settings: &HttpSettings, query: &HttpQuery<'_>) -> Decision {
        let body = match serde_json::to_vec(query) {
            Ok(body) => body,
            Err(e) => return Decision::Unavailable(format!("request: {e}")),
        };
        let key: [u8; 32] = {
            let mut keyed = settings.url.as_bytes().to_vec();
            keyed.push(0);
            keyed.extend_from_slice(&body);
            ring::digest::digest(&ring::digest::SHA256, &keyed).as_ref().try_into().expect("32 bytes")
        };
        let ttl = Duration::from_secs(settings.cache_ttl_secs);
        if let Some(cached) = self.cached(&key, ttl) {
            return cached;
        }
        let timeout = Duration::from_millis(settings.timeout_ms);
        let decision = match tokio::time::timeout(timeout, self.post(&settings.url, body)).await {
            Err(_) => Decision::Unavailable(format!("no answer within {timeout:?}")),
            Ok(Err(e)) => Decision::Unavailable(e),
            Ok(Ok(answer)) => interpret(answer, query),
        };
        if !ttl.is_zero() && !matches!(decision, Decision::Unavailable(_)) {
            self.remember(key, decision.clone(), settings.cache_max_entries);
        }
        decision
    }

    fn cached(&self, key: &[u8; 32], ttl: Duration) -> Option<Decision> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entries.get(key).filter(|(at, _)| at.elapsed() < ttl).map(|(_, d)| d.clone())
    }

    fn remember(&self, key: [u8; 32], decision: Decision, max: usize) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.entries.insert(key, (Instant::now(), decision)).is_none() {
            cache.order.push_back(key);
        }
        while cache.entries.len() > max.max(1) {
            let Some(oldest) = cache.order.pop_front() else { break };
            cache.entries.remove(&oldest);
        }
    }

    async fn post(&self, url: &str, body: Vec<u8>) -> Result<Answer, String> {
        let uri: Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or_else(|| format!("url {url:?} has no host"))?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let allowed = self.config.allowed_hosts.iter().any(|h| *h == host || *h == format!("{host}:{port}"));
        if !allowed {
            return Err(format!("host {host}:{port} is not in this node's auth.http.allowed_hosts"));
        }
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let io: Box<dyn Io> = if https {
            let tls = self.tls.as_ref().ok_or("https needs auth.http.ca_file on this node")?;
            let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("server name {host:?}: {e}"))?;
            Box::new(tls.connect(name, tcp).await.map_err(|e| format!("TLS to {host}:{port}: {e}"))?)
        } else {
            Box::new(tcp)
        };
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(|e| format!("HTTP: {e}"))?;
        let driver = tokio::spawn(connection);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"));
        let result = match response {
            Ok(response) if response.status() == hyper::StatusCode::OK => {
                let body = Limited::new(response.into_body(), MAX_RESPONSE).collect().await.map_err(|e| format!("response body: {e}"))?;
                serde_json::from_slice::<Answer>(&body.to_bytes()).map_err(|e| format!("unreadable answer: {e}"))
            }
            Ok(response) => Err(format!("status {}", response.status())),
            Err(e) => Err(e),
        };
        driver.abort();
        result
    }
}

fn interpret(answer: Answer, query: &HttpQuery<'_>) -> Decision {
    match answer.result.as_str() {
        "allow" => {
            let principal = answer.principal.or(query.username.map(str::to_string)).unwrap_or_else(|| query.client_id.to_string());
            if let Some(e) = answer.rules.iter().flatten().map(super::acl::validate_rule).find_map(Result::err) {
                return Decision::Unavailable(format!("unreadable answer: rules: {e}"));
            }
            Decision::Allow(Arc::new(HttpGrant { principal, client_type: answer.client_type, rules: answer.rules }))
        }
        "deny" => Decision::Deny(answer.reason.unwrap_or_else(|| "denied by the endpoint".into())),
        other => Decision::Unavailable(format!("unreadable answer: result {other:?} is not allow or deny")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> HttpQuery<'static> {
        HttpQuery { client_id: "c1", username: Some("u1"), password: Some("p"), certificate: None, listener: "tcp", peer: None }
    }

    fn answer(json: &str) -> Answer {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn answers_become_decisions() {
        let allow = interpret(
            answer(r#"{"result": "allow", "client_type": "APPLICATION", "rules": [{"access": "read", "pattern": "a/#"}]}"#),
            &query(),
        );
        let Decision::Allow(grant) = allow else { panic!("{allow:?}") };
        assert_eq!((grant.principal.as_str(), grant.client_type), ("u1", Some(ClientType::Application)));
        assert_eq!(interpret(answer(r#"{"result": "deny", "reason": "locked"}"#), &query()), Decision::Deny("locked".into()));
        for bad in [r#"{"result": "maybe"}"#, r#"{"result": "allow", "rules": [{"access": "read", "pattern": "a/#/b"}]}"#] {
            assert!(matches!(interpret(answer(bad), &query()), Decision::Unavailable(_)), "{bad}");
        }
    }

    #[test]
    fn the_cache_is_bounded_oldest_first() {
        let delegate = HttpDelegate::new(&HttpNodeConfig::default()).unwrap();
        for i in 0..5u8 {
            delegate.remember([i; 32], Decision::Deny(i.to_string()), 3);
        }
        assert!(delegate.cached(&[0; 32], Duration::from_secs(60)).is_none());
        assert_eq!(delegate.cached(&[4; 32], Duration::from_secs(60)), Some(Decision::Deny("4".into())));
        assert!(delegate.cached(&[4; 32], Duration::ZERO).is_none(), "expired");
    }

    #[tokio::test]
    async fn hosts_not_allowed_by_the_node_are_never_called() {
        let delegate = HttpDelegate::new(&HttpNodeConfig::default()).unwrap();
        let settings: HttpSettings = toml::from_str("url = \"http://127.0.0.1:9/auth\"").unwrap();
        match delegate.decide(&settings, &query()).await {
            Decision::Unavailable(reason) => assert!(reason.contains("allowed_hosts"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
