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
    /// Build kernels-gpu into one PTX module (`--arch sm_90a`: Hopper, `sm_80`: portable) and list
    /// its entry points.
    BuildPtx(BuildPtx),
    /// Lint both PTX modules (Hopper `sm_90a`, portable `sm_80`), run `ptxas -v` on each for its
    /// architectures, print registers/smem/stack/spills per kernel, and fail on spills, stack
    /// frames, shared memory over a target's limit or entry points that differ from the module's
    /// list in `shared::names`.
    PtxReport(PtxReport),
    /// The project's one test command: `ptx-report`, then `cargo test --workspace`.
    Test(Test),
    /// Build release test binaries and the CLI into one folder, with a `run-tests.sh` for a GPU
    /// machine.
    DeviceBundle(DeviceBundle),
    /// The mutation run: deliberate kernel defects built as PTX modules, for `run-mutants.sh`.
    Mutants(Mutants),
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
    /// Gate only the module built for this architecture (`sm_90a`: Hopper, `sm_80`: portable);
    /// default: both.
    #[arg(long)]
    pub arch: Option<String>,
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
    /// Also build every mutant's PTX into the bundle, with `run-mutants.sh`
    /// (`cargo xtask mutants build`).
    #[arg(long)]
    pub mutants: bool,
}

/// Flags of `cargo xtask mutants`.
#[derive(Debug, Args)]
pub struct Mutants {
    /// What to do.
    #[command(subcommand)]
    pub command: MutantsCommand,
}

/// The subcommands of `cargo xtask mutants`.
#[derive(Debug, Subcommand)]
pub enum MutantsCommand {
    /// Print every mutant's id and description.
    List,
    /// Check that every mutant's edits apply to the current sources (no build).
    Check,
    /// Build the clean module and every mutant's PTX into `<out>/mutants/`, and write
    /// `<out>/run-mutants.sh`.
    Build(MutantsBuild),
}

/// Flags of `cargo xtask mutants build`.
#[derive(Debug, Args)]
pub struct MutantsBuild {
    /// The device bundle folder, relative to the workspace root unless absolute.
    #[arg(long, default_value = ".device-bin")]
    pub out: PathBuf,
    /// GPU architecture of the modules.
    #[arg(long, default_value = DEFAULT_ARCH)]
    pub arch: String,
    /// Only these mutants (ids, comma-separated or repeated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}
