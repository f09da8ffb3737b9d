//! The CRI client of the container tests (pods created through containerd's CRI, as kubelet
//! does), from proto/cri/runtime/v1/api.proto, compiled with protox (no protoc needed).
use anyhow::anyhow;

fn main() -> anyhow::Result<()> {
    let proto = "../../proto/cri/runtime/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../../proto/cri"]).map_err(|e| anyhow!("compiling {proto}: {e}"))?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}
