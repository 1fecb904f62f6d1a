//! Generates the gRPC code from `proto/` without a system `protoc`, and records the libtorch
//! library folder as an rpath so the binary runs without `LD_LIBRARY_PATH`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::ClipCodec")
        .file_descriptor_set_path(out_dir.join("clipserve_descriptor.bin"))
        .compile_protos(&["proto/clipserve/v1/clipserve.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");

    // torch-sys (links = "tch") exports the folder that holds libtorch_cpu.so and friends.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=CLIPSERVE_LIBTORCH_LIB={lib}");
    }
    Ok(())
}
