//! Generates the prost types from envelope.proto with a vendored protoc, so a
//! fresh `cargo build` needs no system packages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    config.btree_map(["."]);
    config.compile_protos(&["envelope.proto"], &["."])?;
    println!("cargo:rerun-if-changed=envelope.proto");
    Ok(())
}
