//! `stowage-csi-local`: the test cluster's CSI driver for local volumes on its real node: node
//! plugin and provisioner in one process (see `stowage_tests::csi_local`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use stowage_tests::csi_local::{self, csi};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The node's name, as the kubelet registers it.
    #[arg(long)]
    node: String,
    /// The node plugin's socket (the kubelet finds it through tests/cluster/csi-registrar).
    #[arg(long)]
    socket: PathBuf,
    /// Where volumes live, one directory each.
    #[arg(long)]
    data_dir: PathBuf,
}

fn listen(path: &std::path::Path) -> anyhow::Result<UnixListenerStream> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(UnixListenerStream::new(UnixListener::bind(path)?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let args = Args::parse();
    let client = stowage_tests::cluster::client_from(&args.kubeconfig).await?;
    std::fs::create_dir_all(&args.data_dir)?;
    let plugin = csi_local::NodePlugin {
        node_id: args.node.clone(),
        data_dir: args.data_dir.clone(),
    };
    let node_server = tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(plugin.clone()))
        .add_service(csi::node_server::NodeServer::new(plugin))
        .serve_with_incoming(listen(&args.socket)?);
    let provisioner =
        csi_local::provision(client, args.node, args.data_dir, Duration::from_millis(500));
    tokio::select! {
        r = node_server => r?,
        () = provisioner => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

fn tracing_subscriber_init() {
    // The harness keeps each process's stderr in its log file.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .finish(),
    );
}
