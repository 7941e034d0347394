//! `stowage-kubelet-emu`: kubelet volume mounts for kwok nodes (see `stowage_tests::kubelet_emu`).

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: std::path::PathBuf,
    #[arg(long, env = "STOWAGE_CLUSTER_DIR")]
    cluster_dir: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = stowage_tests::cluster::client_from(&args.kubeconfig).await?;
    stowage_tests::kubelet_emu::run(client, args.cluster_dir).await
}
