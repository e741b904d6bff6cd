//! `cargo xtask build-ptx`: builds `kernels-gpu` into one PTX module with the same builder that
//! `host/build.rs` uses, so the PTX a developer inspects is the PTX the library embeds.
//!
//! The recipe is documented in `mxmoe-ptx-builder` (`xtask/ptx-builder/src/lib.rs`); the target
//! is described by rustc's platform page,
//! <https://doc.rust-lang.org/nightly/rustc/platform-support/nvptx64-nvidia-cuda.html>.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mxmoe_ptx_builder::{PtxBuild, PtxOutput};

use crate::flags;
use crate::shell;

/// Runs `cargo xtask build-ptx`: builds the module, then prints its path and entry points.
pub fn run(root: &Path, flags: &flags::BuildPtx) -> Result<()> {
    let out = build(root, &flags.arch, flags.out.as_deref())?;
    println!("{}", out.ptx_file.display());
    for entry in &out.entries {
        println!("  .entry {entry}");
    }
    Ok(())
}

/// The default output file for `arch`: `<root>/target/ptx/mxmoe-<arch>.ptx`.
pub fn default_out(root: &Path, arch: &str) -> PathBuf {
    root.join("target")
        .join("ptx")
        .join(format!("mxmoe-{arch}.ptx"))
}

/// The cargo target directory of the device build for `arch`, apart from the host build's
/// ([`mxmoe_ptx_builder::device_target_dir`]: each module keeps its own).
pub fn target_dir(root: &Path, arch: &str) -> PathBuf {
    mxmoe_ptx_builder::device_target_dir(&root.join("target"), arch)
}

/// Builds the PTX module for `arch` into `out` (or [`default_out`]).
pub fn build(root: &Path, arch: &str, out: Option<&Path>) -> Result<PtxOutput> {
    let out_file = match out {
        Some(p) => {
            std::path::absolute(p).with_context(|| format!("bad --out path {}", p.display()))?
        }
        None => default_out(root, arch),
    };
    let build = PtxBuild {
        workspace_root: root.to_path_buf(),
        target_dir: target_dir(root, arch),
        arch: arch.to_string(),
        out_file,
        cargo: shell::cargo(),
    };
    eprintln!("building the {arch} PTX module of kernels-gpu");
    mxmoe_ptx_builder::build_ptx(&build).with_context(|| format!("building the {arch} PTX failed"))
}
