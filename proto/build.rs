//! Generates the tonic/prost code with the vendored `protoc`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // The CLI prints any reply as JSON.
        .type_attribute(".rampart.admin.v1", "#[derive(serde::Serialize)]")
        .compile_with_config(config, &["proto/rampart/admin/v1/admin.proto", "proto/rampart/cluster/v1/cluster.proto"], &["proto"])?;
    Ok(())
}
