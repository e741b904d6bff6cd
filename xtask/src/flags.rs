//! Command-line flags of every subcommand, declared in one place (rust-analyzer keeps its xtask
//! flags in `xtask/src/flags.rs` for the same reason: the whole surface reads at a glance).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mxmoe_ptx_builder::DEFAULT_ARCH;

/// mxmoe developer commands.
#[derive(Debug, Parser)]
#[command(bin_name = "cargo xtask", version, about)]
pub struct Xtask {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build kernels-gpu into one PTX module and list its entry points.
    BuildPtx(BuildPtx),
    /// Lint the PTX, run `ptxas -v` on it, print registers/smem/stack/spills per kernel, and fail
    /// on spills, stack frames or entry points that differ from `shared::names::ALL`.
    PtxReport(PtxReport),
    /// The project's one test command: `ptx-report`, then `cargo test --workspace`.
    Test(Test),
    /// Build release test binaries and the CLI into one folder, with a `run-tests.sh` for a GPU
    /// machine.
    DeviceBundle(DeviceBundle),
}

/// Flags of `cargo xtask build-ptx`.
#[derive(Debug, Args)]
pub struct BuildPtx {
    /// GPU architecture (`-C target-cpu`, `.target`).
    #[arg(long, default_value = DEFAULT_ARCH)]
    pub arch: String,
    /// Where to write the PTX (default: `<root>/target/ptx/mxmoe-<arch>.ptx`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Flags of `cargo xtask ptx-report`.
#[derive(Debug, Args)]
pub struct PtxReport {
    /// GPU architecture to build for and to pass to `ptxas -arch`.
    #[arg(long, default_value = DEFAULT_ARCH)]
    pub arch: String,
    /// Report on this PTX file instead of building one.
    #[arg(long)]
    pub ptx: Option<PathBuf>,
}

/// Flags of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct Test {
    /// Extra arguments for `cargo test`, after `--` (for example `-- -p mxmoe -- --nocapture`).
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

/// Flags of `cargo xtask device-bundle`.
#[derive(Debug, Args)]
pub struct DeviceBundle {
    /// Output folder (emptied first), relative to the workspace root unless absolute.
    #[arg(long, default_value = ".device-bin")]
    pub out: PathBuf,
    /// Folder holding the golden data (default: `<root>/tests/data/golden`).
    #[arg(long)]
    pub golden: Option<PathBuf>,
}
