//! Builds the kernels' two PTX modules with the same builder as `cargo xtask build-ptx` and hands
//! their paths to the library (`MXMOE_PTX_PATH`: the Hopper module, `MXMOE_PTX_PORTABLE_PATH`:
//! the portable `sm_80` one), so a plain `cargo build` embeds fresh PTX. The two device builds
//! have their own target folders and run side by side.

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
    println!("cargo::rerun-if-env-changed=MXMOE_PTX_PORTABLE_FILE");

    // Prebuilt modules (for packaging, or to build the host without the device toolchain).
    let prebuilt = |var: &str| {
        std::env::var_os(var)
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
    };
    let hopper_file = prebuilt("MXMOE_PTX_FILE");
    let portable_file = prebuilt("MXMOE_PTX_PORTABLE_FILE");

    let build = |arch: String, file: &str| mxmoe_ptx_builder::PtxBuild {
        target_dir: mxmoe_ptx_builder::device_target_dir(&root.join("target"), &arch),
        workspace_root: root.clone(),
        arch,
        out_file: out_dir.join(file),
        cargo: cargo.clone(),
    };
    let (hopper, portable) = std::thread::scope(|scope| {
        let hopper = hopper_file.is_none().then(|| {
            let b = build(arch.clone(), "mxmoe.ptx");
            scope.spawn(move || mxmoe_ptx_builder::build_ptx(&b))
        });
        let portable = portable_file.is_none().then(|| {
            let b = build(
                mxmoe_ptx_builder::PORTABLE_ARCH.to_string(),
                "mxmoe-portable.ptx",
            );
            scope.spawn(move || mxmoe_ptx_builder::build_ptx(&b))
        });
        (hopper.map(|h| h.join()), portable.map(|p| p.join()))
    });
    for (var, file, built) in [
        ("MXMOE_PTX_PATH", hopper_file, hopper),
        ("MXMOE_PTX_PORTABLE_PATH", portable_file, portable),
    ] {
        let path = match (file, built) {
            (Some(file), _) => {
                println!("cargo::rerun-if-changed={}", file.display());
                file
            }
            (None, Some(Ok(Ok(out)))) => out.ptx_file,
            (None, Some(Ok(Err(e)))) => {
                println!("cargo::error=building the mxmoe PTX ({var}) failed: {e}");
                std::process::exit(1);
            }
            (None, _) => {
                println!("cargo::error=building the mxmoe PTX ({var}) panicked");
                std::process::exit(1);
            }
        };
        println!("cargo::rustc-env={var}={}", path.display());
    }
}
