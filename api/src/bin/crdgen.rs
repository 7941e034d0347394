//! `crdgen`: writes the CustomResourceDefinitions into the Helm chart (deploy/daemonset/crds/).
//!   cargo run -p stowage-api --bin crdgen [-- <dir>]

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(stowage_api::render::chart_crd_dir, std::path::PathBuf::from);
    for path in stowage_api::render::write_all(&dir)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
