//! Rampart's gRPC APIs, generated from `proto/`: the admin API operators call on port 9443, and
//! the cluster transport (Raft RPCs and node-to-node calls) on the cluster port.

/// Generated modules, nested as the proto packages are (the cluster protos refer to admin types).
pub mod rampart {
    pub mod admin {
        /// `rampart.admin.v1`: the admin API.
        pub mod v1 {
            tonic::include_proto!("rampart.admin.v1");
        }
    }
    pub mod cluster {
        /// `rampart.cluster.v1`: Raft RPCs and node-to-node calls; node certificates only.
        pub mod v1 {
            tonic::include_proto!("rampart.cluster.v1");
        }
    }
}

pub use rampart::admin::v1 as admin;
pub use rampart::cluster::v1 as cluster;
