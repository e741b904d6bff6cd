//! `cargo xtask`: mxmoe's developer commands, in the manner of matklad's `cargo-xtask` pattern.
//!
//! The alias in `.cargo/config.toml` runs this binary, so every command is plain Rust built by the
//! pinned toolchain and needs nothing installed beyond what `rust-toolchain.toml` lists (and, for
//! the ptxas report, a `ptxas` that [`ptxas`] finds or fetches).
//!
//! One module per command, as in rust-analyzer's `xtask/src/main.rs`:
//!
//! | command | module | what it does |
//! |---|---|---|
//! | `build-ptx` | [`build_ptx`] | builds `kernels-gpu` into one PTX module |
//! | `ptx-report` | [`ptx_report`] | lints the PTX, runs `ptxas -v`, prints per-kernel resources, gates spills |
//! | `test` | [`mod@test`] | the one test command: `ptx-report`, then `cargo test --workspace` |
//! | `device-bundle` | [`device_bundle`] | release test binaries plus a runner script for a GPU machine |
//! | `mutants` | [`mutants`] | deliberate kernel defects as PTX modules, and `run-mutants.sh` to prove the suites catch them |
//!
//! The device build itself lives in the `mxmoe-ptx-builder` library (`xtask/ptx-builder`), which
//! `host/build.rs` calls too; it documents the recipe and links rustc's platform page for the
//! target, `src/doc/rustc/src/platform-support/nvptx64-nvidia-cuda.md` in rust-lang/rust.

mod build_ptx;
mod device_bundle;
mod flags;
mod mutants;
mod ptx_report;
mod ptxas;
mod ptxas_log;
mod shell;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::flags::{Command, Xtask};

fn main() -> ExitCode {
    let flags = Xtask::parse();
    let root = project_root();
    let result = match flags.command {
        Command::BuildPtx(f) => build_ptx::run(&root, &f),
        Command::PtxReport(f) => ptx_report::run(&root, &f),
        Command::Test(f) => test::run(&root, &f),
        Command::DeviceBundle(f) => device_bundle::run(&root, &f),
        Command::Mutants(f) => mutants::run(&root, &f),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
///
/// The path is fixed at compile time, as in rust-analyzer's `project_root()`; `cargo xtask` always
/// rebuilds the binary from this checkout, so it always points at the checkout being worked on.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ lives directly inside the workspace root")
        .to_path_buf()
}
