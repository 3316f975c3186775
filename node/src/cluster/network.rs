//! The client side of the Raft transport: openraft's requests serialized (JSON) into
//! `rampart.cluster.v1.Raft` calls over mutual TLS with this node's certificate. Snapshots go
//! as typed chunks so their bytes are not inflated.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use rampart_proto::cluster::raft_client::RaftClient;
use rampart_proto::cluster::{RaftBytes, SnapshotChunk};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{NodeId, NodeInfo, TypeConfig};

/// Largest gRPC message either side accepts (snapshot chunks are kept well below).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A lazily connecting channel to a peer's cluster port.
pub fn peer_channel(raft_addr: &str, tls: &ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{raft_addr}"))?
        .tls_config(tls.clone())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Creates a [`Peer`] per target node.
pub struct Network {
    pub tls: ClientTlsConfig,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Peer {
        let client = peer_channel(&node.raft_addr, &self.tls)
            .map(|channel| {
                RaftClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
            })
            .map_err(|e| e.to_string());
        Peer { target, client }
    }
}

pub struct Peer {
    target: NodeId,
    /// Err: the member's address is unusable (reported on every call).
    client: Result<RaftClient<Channel>, String>,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("openraft messages serialize")
}

impl Peer {
    fn client<E: std::error::Error>(&self) -> RpcResult<RaftClient<Channel>, E> {
        self.client.clone().map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))
    }

    /// Decodes a reply: a transport failure makes the peer unreachable (openraft backs off);
    /// a remote Raft error is passed on as such.
    fn reply<T, E>(&self, reply: Result<tonic::Response<RaftBytes>, tonic::Status>) -> RpcResult<T, E>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let bytes = reply.map_err(|status| RPCError::Unreachable(Unreachable::new(&status)))?.into_inner().payload;
        match serde_json::from_slice::<Result<T, RaftError<NodeId, E>>>(&bytes) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

fn request<T>(message: T, option: &RPCOption) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(option.hard_ttl());
    request
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let reply = self.client()?.append_entries(request(RaftBytes { payload: json(&rpc) }, &option)).await;
        self.reply(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let chunk =
            SnapshotChunk { vote_json: json(&rpc.vote), meta_json: json(&rpc.meta), offset: rpc.offset, data: rpc.data, done: rpc.done };
        let reply = self.client()?.install_snapshot(request(chunk, &option)).await;
        self.reply(reply)
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let reply = self.client()?.vote(request(RaftBytes { payload: json(&rpc) }, &option)).await;
        self.reply(reply)
    }
}
