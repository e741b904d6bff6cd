//! `cargo xtask test`: the project's one test command, used by developers and by `.ci/run`.
//!
//! 1. The PTX gate ([`crate::ptx_report`]): build the module, lint it, assemble it with
//!    `ptxas -v`, fail on local memory or an entry set that differs from `shared::names::ALL`.
//! 2. `cargo test --workspace`: every unit, integration and doc test. GPU suites run where a CUDA
//!    device is present and print why they skip where none is (`MXMOE_REQUIRE_GPU=1` turns a skip
//!    into a failure).
//!
//! Each step stops the command on failure with a message that names the step.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use mxmoe_ptx_builder::DEFAULT_ARCH;

use crate::{build_ptx, flags, ptx_report, shell};

/// Runs `cargo xtask test [-- <cargo test args>]`.
pub fn run(root: &Path, flags: &flags::Test) -> Result<()> {
    eprintln!("== step 1/2: PTX build and ptxas report ({DEFAULT_ARCH})");
    let ptx = build_ptx::build(root, DEFAULT_ARCH, None).context("step 1/2 (PTX build) failed")?;
    ptx_report::report(root, &ptx.ptx_file, DEFAULT_ARCH)
        .context("step 1/2 (ptx-report gate) failed")?;

    eprintln!("== step 2/2: cargo test --workspace");
    shell::run(
        Command::new(shell::cargo())
            .current_dir(root)
            .args(["test", "--workspace"])
            .args(&flags.cargo_args),
    )
    .context("step 2/2 (cargo test --workspace) failed")?;

    eprintln!("== cargo xtask test: all steps passed");
    Ok(())
}
