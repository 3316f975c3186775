//! Starts a node from a validated [`Config`]: binds every listener and the HTTP endpoint, runs
//! the session reaper, and stops everything on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::auth::authenticator::Authenticator;
use crate::auth::store::{read_state, AuthStore};
use crate::broker::clients::ConnectedClients;
use crate::broker::Broker;
use crate::cluster::Cluster;
use crate::config::{Config, ListenerKind};
use crate::forward::Forwarder;
use crate::listener::{self, connection::ConnectionContext};
use crate::telemetry;

/// A running node.
pub struct Server {
    pub broker: Broker,
    /// Credentials and permissions; `reload` re-reads the state file.
    pub auth: Arc<AuthStore>,
    /// Bound MQTT listeners (useful when a port was 0).
    pub listeners: Vec<(ListenerKind, SocketAddr)>,
    pub http: Option<SocketAddr>,
    /// The Raft member, when the node is part of a cluster.
    pub cluster: Option<Arc<Cluster>>,
    /// TLS configurations in force and what they are built from, for reloads.
    tls: Vec<(crate::config::TlsFiles, Arc<arc_swap::ArcSwap<rustls::ServerConfig>>)>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Binds everything and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Server> {
        let sessions = crate::broker::persist::SessionStore::open(&config.node.data_dir)?;
        let broker = Broker::new(config.broker_settings(), Some(sessions));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let clients = Arc::new(ConnectedClients::default());
        let mut tasks = JoinSet::new();
        let (auth, cluster, forwarder) = match (&config.cluster, crate::forward::ForwardSettings::of(config)) {
            (Some(cluster_config), Some(forward)) => {
                let auth = Arc::new(AuthStore::replicated());
                let seed = config.auth.state_file.as_deref().map(read_state).transpose()?;
                let cluster = Cluster::start(cluster_config, &config.node.data_dir, auth.clone(), seed).await?;
                let forwarder = Forwarder::start(forward, broker.clone(), cluster.clone(), auth.clone(), shutdown_rx.clone()).await?;
                start_cluster_services(config, &cluster, &forwarder, &auth, &clients, &shutdown_rx, &mut tasks).await?;
                (auth, Some(cluster), Some(forwarder))
            }
            _ => (Arc::new(AuthStore::open(config.auth.state_file.clone())?), None, None),
        };
        auth.set_http(crate::auth::http::HttpDelegate::new(&config.auth.http)?);
        let ctx = Arc::new(ConnectionContext {
            broker: broker.clone(),
            limits: config.session_limits(),
            authenticator: Authenticator::new(
                config.auth_policy(),
                auth.clone(),
                config.password_gate(),
                Duration::from_secs(config.limits.connect_timeout_secs),
            ),
            auth_store: auth.clone(),
            clients: clients.clone(),
            connect_timeout: Duration::from_secs(config.limits.connect_timeout_secs),
            write_timeout: Duration::from_secs(config.limits.write_timeout_secs),
            shutdown: shutdown_rx.clone(),
        });
        let bound = listener::bind(&config.listener_specs(), &auth).await?;
        let ready = Arc::new(AtomicBool::new(false));
        let http = if config.http.enabled {
            let socket = telemetry::http::bind(config.http.bind).await?;
            let addr = socket.local_addr()?;
            let status = Arc::new(Status {
                broker: broker.clone(),
                clients: clients.clone(),
                forwarder,
                listening: ready.clone(),
                auth: auth.clone(),
            });
            tasks.spawn(telemetry::http::serve(socket, status, shutdown_rx.clone()));
            Some(addr)
        } else {
            None
        };
        let slots = Arc::new(Semaphore::new(config.limits.max_connections));
        let pacer = listener::pacing::AcceptPacer::new(config.limits.accept_rate, config.limits.accept_burst, Instant::now()).map(Arc::new);
        let listeners = bound.iter().map(|l| (l.kind, l.local_addr)).collect();
        let tls: Vec<_> = bound.iter().filter_map(|l| Some((l.tls_files.clone()?, l.tls.clone()?))).collect();
        auth.set_crl_revocations(crl_revocations(&tls)?);
        for listener in bound {
            tasks.spawn(listener::run(listener, ctx.clone(), slots.clone(), pacer.clone()));
        }
        tasks.spawn(reap_sessions(broker.clone(), shutdown_rx));
        ready.store(true, Ordering::Relaxed);
        Ok(Server { broker, auth, listeners, http, cluster, tls, shutdown, tasks })
    }

    /// Re-reads the TLS files (certificates, CA bundles, CRLs) and the authorization state. New
    /// handshakes use them at once; live connections re-check themselves. On error nothing changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let configs = self.tls.iter().map(|(files, _)| crate::tls::server_config(files, &self.auth)).collect::<Result<Vec<_>, _>>()?;
        let revoked = crl_revocations(&self.tls)?;
        self.auth.reload()?;
        for ((_, current), config) in self.tls.iter().zip(configs) {
            current.store(config);
        }
        self.auth.set_crl_revocations(revoked);
        Ok(())
    }

    /// Stops accepting, tells every connection to close (MQTT 5 clients get DISCONNECT 0x8B) and
    /// waits up to `grace` for them.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::timeout_at(deadline, self.tasks.join_next()).await.is_ok_and(|t| t.is_some()) {}
        while telemetry::metrics::open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.broker.sync_store().await;
        if let Some(cluster) = &self.cluster {
            cluster.shutdown().await;
        }
    }
}

/// Binds and serves the cluster port and, when configured, the admin API.
async fn start_cluster_services(
    config: &Config,
    cluster: &Arc<Cluster>,
    forwarder: &Arc<Forwarder>,
    auth: &Arc<AuthStore>,
    clients: &Arc<ConnectedClients>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let cluster_config = config.cluster.clone().expect("called for cluster members");
    let bind = |addr: SocketAddr, key: &'static str| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("{key} {addr}: {e}"))
    };
    let listener = bind(cluster_config.bind, "cluster.bind").await?;
    tracing::info!(addr = %listener.local_addr()?, node_id = cluster_config.node_id, "cluster port");
    tasks.spawn(crate::cluster::standing::watch(cluster.clone(), auth.clone(), shutdown.clone()));
    let (c, cl, a, s) = (cluster.clone(), clients.clone(), auth.clone(), shutdown.clone());
    tasks.spawn(async move {
        if let Err(e) = crate::cluster::service::serve(listener, &cluster_config, c, cl, a, s).await {
            tracing::error!(error = %format!("{e:#}"), "cluster port stopped");
        }
    });
    let Some(admin_config) = config.admin.clone() else { return Ok(()) };
    let listener = bind(admin_config.bind, "admin.bind").await?;
    tracing::info!(addr = %listener.local_addr()?, "admin API");
    // Listeners that ask for client certificates: an imported CRL must be signed by one of their
    // CAs (or the admin CA), and `check-access --certificate` reads identities as they do.
    let client_auth: Vec<_> = config.listener_specs().into_iter().filter_map(|spec| spec.tls?.client_auth).collect();
    let client_cas = client_auth.iter().map(|c| c.ca_file.clone());
    let ca_files: Vec<_> = client_cas.chain([admin_config.ca_file.clone()]).collect();
    let loaded = ca_files.iter().map(|f| crate::tls::load_certs(f)).collect::<Result<Vec<_>, _>>()?;
    let trusted_cas = loaded.into_iter().flatten().map(|c| c.to_vec()).collect();
    let service = crate::admin::service::AdminService::new(
        cluster.clone(),
        auth.clone(),
        clients.clone(),
        trusted_cas,
        config.auth_policy(),
        forwarder.clone(),
        crate::admin::service::certificate_identity(client_auth.into_iter().map(|c| c.identity)),
    );
    let s = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = crate::admin::serve(listener, &admin_config, service, s).await {
            tracing::error!(error = %format!("{e:#}"), "admin API stopped");
        }
    });
    Ok(())
}

/// The certificates revoked by the CRL files of every listener that verifies client certificates.
fn crl_revocations(
    tls: &[(crate::config::TlsFiles, Arc<arc_swap::ArcSwap<rustls::ServerConfig>>)],
) -> Result<std::collections::HashSet<(String, String)>, crate::tls::TlsError> {
    crate::tls::crl_revocations(tls.iter().filter_map(|(files, _)| files.client_auth.as_ref()).flat_map(|c| c.crl_files.iter()))
}

/// Ends offline sessions whose expiry passed, once a second.
async fn reap_sessions(broker: Broker, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => broker.expire_sessions(Instant::now()),
            _ = shutdown.changed() => return,
        }
    }
}

/// What the HTTP endpoint reports: the broker's gauges; ready once the listeners accept and, in
/// a cluster, while this node is a member that serves clients.
struct Status {
    broker: Broker,
    clients: Arc<ConnectedClients>,
    forwarder: Option<Arc<Forwarder>>,
    listening: Arc<AtomicBool>,
    auth: Arc<AuthStore>,
}

impl telemetry::http::NodeStatus for Status {
    fn gauges(&self) -> telemetry::metrics::Gauges {
        let mut gauges = self.broker.gauges();
        gauges.links = self.forwarder.as_ref().map(|f| f.link_gauges()).unwrap_or_default();
        gauges.cert_expiry = self.clients.cert_expiry(crate::clock::unix_now());
        gauges
    }

    fn not_ready(&self) -> Option<String> {
        if !self.listening.load(Ordering::Relaxed) {
            return Some("starting".into());
        }
        self.auth.out_of_service().as_deref().map(|reason| format!("not serving: {reason}"))
    }
}
