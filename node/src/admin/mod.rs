//! The admin API: the gRPC service operators call on the admin port (admin certificates only),
//! its serving, and the `rampart admin` command-line client.

pub mod cli;
pub mod convert;
pub mod service;

use rampart_proto::admin::admin_server::AdminServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::config::AdminConfig;

/// Serves the admin API until `shutdown` turns true. Clients without a certificate get through
/// the handshake so that they can be told why they are refused (Unauthenticated).
pub async fn serve(
    listener: TcpListener,
    config: &AdminConfig,
    service: service::AdminService,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = crate::tls::grpc_server_tls(&config.cert_file, &config.key_file, &config.ca_file, true)?;
    let admin = AdminServer::new(service)
        .max_decoding_message_size(crate::cluster::network::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::cluster::network::MAX_MESSAGE_BYTES);
    Server::builder()
        .tls_config(tls)?
        .add_service(admin)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}
