//! Builds the kernels' PTX with the same builder as `cargo xtask build-ptx` and hands its path
//! to the library (`MXMOE_PTX_PATH`), so a plain `cargo build` embeds fresh PTX.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = PathBuf::from(std::env::var_os("CARGO").expect("cargo sets CARGO"));
    let arch =
        std::env::var("MXMOE_ARCH").unwrap_or_else(|_| mxmoe_ptx_builder::DEFAULT_ARCH.to_string());

    println!(
        "cargo::rerun-if-changed={}",
        root.join("kernels-gpu/src").display()
    );
    println!(
        "cargo::rerun-if-changed={}",
        root.join("kernels-gpu/Cargo.toml").display()
    );
    println!("cargo::rerun-if-env-changed=MXMOE_ARCH");
    println!("cargo::rerun-if-env-changed=MXMOE_PTX_FILE");

    // A prebuilt module (for packaging, or to build the host without the device toolchain).
    if let Some(file) = std::env::var_os("MXMOE_PTX_FILE").filter(|f| !f.is_empty()) {
        let file = PathBuf::from(file);
        println!("cargo::rerun-if-changed={}", file.display());
        println!("cargo::rustc-env=MXMOE_PTX_PATH={}", file.display());
        return;
    }

    let build = mxmoe_ptx_builder::PtxBuild {
        workspace_root: root.clone(),
        target_dir: root.join("target/ptx"),
        arch,
        out_file: out_dir.join("mxmoe.ptx"),
        cargo,
    };
    match mxmoe_ptx_builder::build_ptx(&build) {
        Ok(out) => println!("cargo::rustc-env=MXMOE_PTX_PATH={}", out.ptx_file.display()),
        Err(e) => {
            println!("cargo::error=building the mxmoe PTX failed: {e}");
            std::process::exit(1);
        }
    }
}
