//! The node agent's gRPC API, `stowage.agent.v1`.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("stowage.agent.v1");

        /// Encoded file descriptor set, for gRPC server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("stowage_agent_v1_descriptor");
    }
}

pub use agent::v1;
