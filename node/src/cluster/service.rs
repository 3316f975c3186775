//! The server side of the cluster port: openraft's RPCs (`Raft`) and node-to-node calls
//! (`Node`: forwarded writes, progress, this node's clients, kicks). Mutual TLS with the node
//! certificate; every call must come from a node certificate (OU rampart-node, not revoked)
//! bound to a node id, checked per call: Raft RPCs and every `Node` call but `progress` only from
//! a current member (a node that knows no membership yet, waiting to be added, accepts the Raft
//! RPCs that will tell it), a Raft RPC only on behalf of the node the certificate names.

use std::sync::Arc;

use openraft::raft::InstallSnapshotRequest;
use rampart_proto::admin::{self as pb, KickClientReply, KickClientRequest, ListSessionsReply, ListSessionsRequest};
use rampart_proto::cluster::node_server::{Node, NodeServer};
use rampart_proto::cluster::raft_server::{Raft as RaftRpc, RaftServer};
use rampart_proto::cluster::{ProgressReply, ProgressRequest, RaftBytes, SnapshotChunk};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use super::network::MAX_MESSAGE_BYTES;
use super::{Cluster, Proposal};
use crate::auth::state::ClientType;
use crate::auth::store::AuthStore;
use crate::broker::clients::{ClientInfo, ConnectedClients};
use crate::config::ClusterConfig;
use crate::tls::caller::NodeCertificate;

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("undecodable cluster message: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Response<RaftBytes> {
    Response::new(RaftBytes { payload: serde_json::to_vec(value).expect("cluster replies serialize") })
}

/// The node a call comes from, as its certificate says (put there by the port's interceptor).
fn caller<T>(request: &Request<T>) -> Result<NodeCertificate, Status> {
    request.extensions().get::<NodeCertificate>().cloned().ok_or_else(|| Status::unauthenticated("no verified node certificate"))
}

/// The calling node when it is a current member; `bootstrap`: also any node while this node
/// knows no membership (it waits to be added and learns the membership from these calls).
fn member<T>(cluster: &Cluster, request: &Request<T>, bootstrap: bool) -> Result<NodeCertificate, Status> {
    let node = caller(request)?;
    let members = cluster.members();
    if members.iter().any(|(id, _, _)| *id == node.node_id) || (bootstrap && members.is_empty()) {
        return Ok(node);
    }
    Err(Status::permission_denied(format!("node {} ({:?}) is not a member of this cluster", node.node_id, node.name)))
}

/// Refuses a Raft RPC sent on behalf of another node than the caller's certificate names.
fn on_behalf_of(node: &NodeCertificate, vote: &openraft::Vote<super::NodeId>) -> Result<(), Status> {
    match vote.leader_id().voted_for() {
        Some(id) if id == node.node_id => Ok(()),
        other => Err(Status::permission_denied(format!(
            "node {} ({:?}) sent a Raft message on behalf of node {other:?}",
            node.node_id, node.name
        ))),
    }
}

pub struct RaftService {
    cluster: Arc<Cluster>,
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let node = member(&self.cluster, &request, true)?;
        let rpc: openraft::raft::AppendEntriesRequest<super::TypeConfig> = decode(&request.into_inner().payload)?;
        on_behalf_of(&node, &rpc.vote)?;
        Ok(reply(&self.cluster.raft.append_entries(rpc).await))
    }

    async fn vote(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let node = member(&self.cluster, &request, true)?;
        let rpc: openraft::raft::VoteRequest<super::NodeId> = decode(&request.into_inner().payload)?;
        on_behalf_of(&node, &rpc.vote)?;
        Ok(reply(&self.cluster.raft.vote(rpc).await))
    }

    async fn install_snapshot(&self, request: Request<SnapshotChunk>) -> Result<Response<RaftBytes>, Status> {
        let node = member(&self.cluster, &request, true)?;
        let chunk = request.into_inner();
        let vote = decode(&chunk.vote_json)?;
        on_behalf_of(&node, &vote)?;
        let rpc =
            InstallSnapshotRequest { vote, meta: decode(&chunk.meta_json)?, offset: chunk.offset, data: chunk.data, done: chunk.done };
        Ok(reply(&self.cluster.raft.install_snapshot(rpc).await))
    }
}

pub struct NodeService {
    cluster: Arc<Cluster>,
    clients: Arc<ConnectedClients>,
}

/// At most this many sessions per node in one listing.
pub const MAX_SESSIONS_LISTED: usize = 10_000;

#[tonic::async_trait]
impl Node for NodeService {
    async fn write(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        member(&self.cluster, &request, false)?;
        let proposal: Proposal = decode(&request.into_inner().payload)?;
        Ok(reply(&self.cluster.propose_here(proposal).await))
    }

    async fn progress(&self, _request: Request<ProgressRequest>) -> Result<Response<ProgressReply>, Status> {
        Ok(Response::new(self.cluster.progress()))
    }

    async fn sessions(&self, request: Request<ListSessionsRequest>) -> Result<Response<ListSessionsReply>, Status> {
        member(&self.cluster, &request, false)?;
        Ok(Response::new(local_sessions(self.cluster.id, &self.clients, &request.into_inner())))
    }

    async fn kick(&self, request: Request<KickClientRequest>) -> Result<Response<KickClientReply>, Status> {
        member(&self.cluster, &request, false)?;
        Ok(Response::new(local_kick(self.cluster.id, &self.clients, &request.into_inner())))
    }
}

/// The clients connected to this node that a listing asks for.
pub fn local_sessions(node_id: u64, clients: &ConnectedClients, request: &ListSessionsRequest) -> ListSessionsReply {
    let limit = if request.limit == 0 { MAX_SESSIONS_LISTED } else { (request.limit as usize).min(MAX_SESSIONS_LISTED) };
    let expiring_before = (request.expiring_within_secs > 0)
        .then(|| crate::clock::unix_now().saturating_add(i64::try_from(request.expiring_within_secs).unwrap_or(i64::MAX)));
    let sessions = clients.list(&request.contains, expiring_before, limit).iter().map(|info| client_session(node_id, info)).collect();
    ListSessionsReply { sessions, unreachable_nodes: vec![] }
}

/// Disconnects a client from this node.
pub fn local_kick(node_id: u64, clients: &ConnectedClients, request: &KickClientRequest) -> KickClientReply {
    let kicked = clients.kick(&request.client_id, &request.reason);
    KickClientReply { kicked_on: if kicked > 0 { vec![node_id] } else { vec![] }, unreachable_nodes: vec![] }
}

/// Serves the cluster port until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    config: &ClusterConfig,
    cluster: Arc<Cluster>,
    clients: Arc<ConnectedClients>,
    auth: Arc<AuthStore>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = crate::tls::grpc_server_tls(&config.cert_file, &config.key_file, &config.ca_file, false)?;
    let nodes_only = move |mut request: Request<()>| {
        let node = crate::tls::caller::authorize_node(&request, &auth)?;
        request.extensions_mut().insert(node);
        Ok(request)
    };
    let raft = RaftServer::new(RaftService { cluster: cluster.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let node = NodeServer::new(NodeService { cluster, clients }).max_decoding_message_size(MAX_MESSAGE_BYTES);
    Server::builder()
        .tls_config(tls)?
        .add_service(InterceptedService::new(raft, nodes_only.clone()))
        .add_service(InterceptedService::new(node, nodes_only))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}

impl From<ClientType> for pb::ClientType {
    fn from(t: ClientType) -> Self {
        match t {
            ClientType::Device => pb::ClientType::Device,
            ClientType::Application => pb::ClientType::Application,
        }
    }
}

/// A connected client as the admin API shows it.
fn client_session(node_id: u64, c: &ClientInfo) -> pb::ClientSession {
    pb::ClientSession {
        node_id,
        client_id: c.client_id.clone(),
        identity: c.identity.clone(),
        client_type: pb::ClientType::from(c.client_type) as i32,
        credential: c.credential.clone(),
        cert_serial: c.cert_serial.clone(),
        cert_issuer: c.cert_issuer.clone(),
        cert_not_after: c.cert_not_after,
        connected_at: c.connected_at,
        peer: c.peer.clone(),
    }
}
