//! Generates the test cluster's CSI node plugin API (a subset of csi.v1). protoc comes from `protoc-bin-vendored`, as for the agent's API.
use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    let include = include
        .to_str()
        .ok_or("protoc's include path is not UTF-8")?;
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/csi/v1/csi.proto"],
        &["proto", include],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
