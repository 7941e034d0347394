//! `crdgen`: writes the CustomResourceDefinitions into the Helm chart (deploy/daemonset/crds/).
//!   cargo run -p stowage-coordinator --bin crdgen [-- <dir>]

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).map_or_else(
        stowage_coordinator::crd::chart_crd_dir,
        std::path::PathBuf::from,
    );
    for path in stowage_coordinator::crd::write_all(&dir)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
