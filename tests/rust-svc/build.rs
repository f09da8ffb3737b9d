//! Generates the gRPC code of proto/echo.proto (protox: no protoc needed).
fn main() {
    let proto = "proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compiling proto/echo.proto");
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds).expect("generating the Echo service");
}
