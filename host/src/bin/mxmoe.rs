//! `mxmoe`: the command-line front end of the mxmoe library.
//!
//! - `mxmoe info`: driver, devices and their limits, the embedded PTX (and, with `--kernels`, the
//!   registers and shared memory of every kernel);
//! - `mxmoe smoke`: small end-to-end problems through the CPU reference and every GPU path, with a
//!   PASS/FAIL parity table (CPU reference only when there is no GPU);
//! - `mxmoe bench`: SPEC §8's single-projection benchmark and the gpt-oss-20b/120b expert
//!   layers (`--shape gpt-oss-20b`), timed with CUDA events;
//! - `mxmoe quantize`: MXFP4-quantize the expert weights of a safetensors file (torchao or gpt-oss
//!   layout);
//! - `mxmoe run`: one expert projection or MoE block on tensors from a safetensors file
//!   (`mxmoe::run_file`), outputs and gradients written to another (CPU reference without a GPU).
//!
//! Exit status: 0 on success (also when there is no GPU: that is reported, not an error), 1 when
//! `smoke` finds a mismatch, 2 when a command fails (the reason is printed as one sentence).
//! `anyhow` lives only here (STYLE §8): library errors are typed and get their context attached
//! at the call sites below.

// The modules live in `mxmoe/` (a plain `mod` would look beside this file, where Cargo would
// also take every `.rs` for a binary of its own).
#[path = "mxmoe/bench.rs"]
mod bench;
#[path = "mxmoe/env.rs"]
mod env;
#[path = "mxmoe/info.rs"]
mod info;
#[path = "mxmoe/output.rs"]
mod output;
#[path = "mxmoe/problem.rs"]
mod problem;
#[path = "mxmoe/quantize.rs"]
mod quantize;
#[path = "mxmoe/rng.rs"]
mod rng;
#[path = "mxmoe/routing_gen.rs"]
mod routing_gen;
#[path = "mxmoe/run.rs"]
mod run;
#[path = "mxmoe/smoke.rs"]
mod smoke;
#[path = "mxmoe/strategy.rs"]
mod strategy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Fused ScatterMoE-LoRA over MXFP4/bf16 expert weights: device info, smoke test, benchmark,
/// checkpoint quantizer and a one-call runner.
#[derive(Debug, Parser)]
#[command(
    name = "mxmoe",
    version,
    propagate_version = true,
    after_help = "Exit status: 0 on success (also without a GPU), 1 when `smoke` finds a mismatch, 2 on an error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the CUDA driver, the devices and their limits, and the embedded PTX.
    Info(info::InfoArgs),
    /// Run small forward + backward problems on the CPU reference and the GPU and compare them
    /// (exit status 1 on a mismatch); without a GPU, run the CPU reference only.
    Smoke(smoke::SmokeArgs),
    /// Time forward + backward of one expert projection at SPEC §8's shapes, or of a gpt-oss
    /// expert layer (`--shape gpt-oss-20b|gpt-oss-120b`) (Markdown to stdout, progress to
    /// stderr, optional JSON); without a GPU, print the plan only.
    Bench(bench::BenchArgs),
    /// MXFP4-quantize the bf16/f32 expert weights of a safetensors file (torchao or gpt-oss
    /// layout); other tensors are copied unchanged.
    Quantize(quantize::QuantizeArgs),
    /// Run one expert projection or MoE block (forward + backward) on tensors from a safetensors
    /// file and write the output and gradients; on the CPU reference without a GPU.
    #[command(after_long_help = run::format_help())]
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Info(args) => info::run(args).map(|()| true),
        Command::Smoke(args) => smoke::run(args),
        Command::Bench(args) => bench::run(args).map(|()| true),
        Command::Quantize(args) => quantize::run(args).map(|()| true),
        Command::Run(args) => run::run(args).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
