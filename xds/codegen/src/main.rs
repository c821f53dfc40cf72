//! Compiles `xds/proto` with protox (pure Rust) and writes the prost code into `xds/src/pb/`.
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let xds = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let proto_root = xds.join("proto");
    let files = protox::compile(["rocketmesh/v1/topic_route.proto"], [&proto_root])?;
    let out = xds.join("src").join("pb");
    std::fs::create_dir_all(&out)?;
    prost_build::Config::new()
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com")
        .btree_map(["."])
        .out_dir(&out)
        .compile_fds(files)?;
    println!("wrote {}", out.display());
    Ok(())
}
