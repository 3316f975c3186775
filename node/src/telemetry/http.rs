//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (process alive) and `/readyz`
//! (listeners accepting and, in a cluster, this node a member that serves clients).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Gauges;

/// What the endpoint reports about the node; implemented by the server, so telemetry knows
/// nothing of brokers or clusters.
pub trait NodeStatus: Send + Sync + 'static {
    fn gauges(&self) -> Gauges;
    /// `None` when the node serves clients; otherwise why not.
    fn not_ready(&self) -> Option<String>;
}

/// Serves the endpoints on an already bound socket until shutdown.
pub async fn serve(listener: TcpListener, status: Arc<dyn NodeStatus>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, status.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn respond(request: Request<Incoming>, status: Arc<dyn NodeStatus>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4", super::metrics::render(status.gauges())),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => match status.not_ready() {
            None => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".to_string()),
    };
    let response = Response::builder().status(status).header("content-type", content_type).body(Full::new(Bytes::from(body)));
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// Binds the HTTP endpoint.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("http.bind {addr}: {e}"))
}
