//! `cargo xtask test`: the project's one test command, used by developers and by `.ci/run`.
//!
//! 1. The PTX gate ([`crate::ptx_report`]) for both modules: build the Hopper (`sm_90a`) and the
//!    portable (`sm_80`) module at the same time, lint them, assemble them with `ptxas -v` (the
//!    portable one for each of its architectures, in parallel), fail on local memory, shared
//!    memory over a target's limit or an entry set that differs from the module's list.
//! 2. `cargo test --workspace`: every unit, integration and doc test. GPU suites run where a CUDA
//!    device is present and print why they skip where none is (`MXMOE_REQUIRE_GPU=1` turns a skip
//!    into a failure).
//!
//! Each step stops the command on failure with a message that names the step.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use kernels_gpu::shared::module::PtxModule;

use crate::{build_ptx, flags, ptx_report, shell};

/// Runs `cargo xtask test [-- <cargo test args>]`.
pub fn run(root: &Path, flags: &flags::Test) -> Result<()> {
    let started = std::time::Instant::now();
    eprintln!(
        "== step 1/2: PTX build and ptxas report ({} and {})",
        PtxModule::Hopper.arch(),
        PtxModule::Portable.arch()
    );
    // The two device builds have their own target folders, so they run side by side.
    let built = std::thread::scope(|scope| {
        let jobs: Vec<_> = PtxModule::ALL
            .into_iter()
            .map(|m| scope.spawn(move || (m, build_ptx::build(root, m.arch(), None))))
            .collect();
        jobs.into_iter().map(|j| j.join()).collect::<Vec<_>>()
    });
    for joined in built {
        let (module, ptx) = joined.map_err(|_| anyhow::anyhow!("a PTX build thread panicked"))?;
        let ptx = ptx.with_context(|| format!("step 1/2 ({} PTX build) failed", module.name()))?;
        ptx_report::report(root, &ptx.ptx_file, module)
            .with_context(|| format!("step 1/2 ({} ptx-report gate) failed", module.name()))?;
    }
    eprintln!("== step 1/2 took {:.0} s", started.elapsed().as_secs_f64());

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
