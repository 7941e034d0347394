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

/// The largest message either side sends or decodes: a repository's snapshot list is the largest
/// answer (about 300 bytes a snapshot), far above tonic's 4 MiB default for big repositories.
pub const MESSAGE_MAX: usize = 32 * 1024 * 1024;

/// The largest request the agent decodes: requests carry a repository, an identity and a command
/// line or a few paths.
pub const REQUEST_MAX: usize = 4 * 1024 * 1024;
