//! `stowage-kubelet-emu`: kubelet volume mounts for kwok nodes, and the pods of local images run as
//! local processes (see `stowage_tests::kubelet_emu` and `stowage_tests::pod_runner`).

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: std::path::PathBuf,
    #[arg(long, env = "STOWAGE_CLUSTER_DIR")]
    cluster_dir: std::path::PathBuf,
    /// An image the harness runs itself: `repository=/in/image:/host/file,...` (first: entrypoint).
    #[arg(long = "local-image")]
    local_images: Vec<String>,
    /// Where pods reach the API server (`KUBERNETES_SERVICE_HOST`/`PORT`).
    #[arg(long, default_value = "127.0.0.1")]
    api_host: String,
    #[arg(long, default_value_t = 6443)]
    api_port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = stowage_tests::cluster::client_from(&args.kubeconfig).await?;
    let images = args
        .local_images
        .iter()
        .map(|s| stowage_tests::pod_runner::LocalImage::parse(s).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runner = (!images.is_empty()).then(|| stowage_tests::pod_runner::Config {
        cluster: args.cluster_dir.clone(),
        images,
        api_host: args.api_host,
        api_port: args.api_port,
    });
    stowage_tests::kubelet_emu::run(client, args.cluster_dir, runner).await
}
