//! Compiles `proto/fedrec.proto` with protox (pure Rust): no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/fedrec.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        // prost's codec, but undecodable messages are INVALID_ARGUMENT.
        .codec_path("crate::protobuf_codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
