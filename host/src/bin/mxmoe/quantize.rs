//! `mxmoe quantize`: MXFP4-quantizes the expert weights of a safetensors file
//! ([`mxmoe::checkpoint::quantize_file`]).
//!
//! Every rank-3 `BF16` or `F32` tensor `[E, N, K]` with `K` a multiple of 32 is quantized with the
//! torchao FLOOR quantizer (SPEC §1.4), unless `--tensors` names the ones to quantize; all other
//! tensors are copied unchanged. Naming of the outputs: `--layout torchao` writes
//! `<name>.packed` u8 `[E, N, K/2]` and `<name>.scales` u8 `[E, N, K/32]`; `--layout gpt-oss`
//! writes `<name>_blocks` u8 `[E, N, K/32, 16]` and `<name>_scales` u8 `[E, N, K/32]`. The
//! layout and provenance go into `__metadata__` (`mxmoe.layout`, `mxmoe.quantizer`,
//! `mxmoe.quantized`, `mxmoe.source`, `mxmoe.version`). MXFP4 weights already in the file and
//! stored in the other layout are converted to `--layout` (the same bytes, renamed and
//! reshaped), so the recorded layout holds for every MXFP4 weight in the output.
//!
//! The output is written to a temporary file beside it and renamed over it when complete, so
//! `OUT` may be `IN`, and a failed run leaves `OUT` as it was.

use std::path::PathBuf;

use anyhow::Context as _;
use mxmoe::checkpoint::{MxLayoutKind, QuantizeOptions, escape, quantize_file};

use crate::env::mib;
use crate::output::write_atomic;

/// The two MXFP4 checkpoint layouts, as command-line values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutArg {
    /// torchao / axolotl: `<name>.packed` u8 [E, N, K/2] + `<name>.scales` u8 [E, N, K/32].
    Torchao,
    /// gpt-oss: `<name>_blocks` u8 [E, N, K/32, 16] + `<name>_scales` u8 [E, N, K/32].
    GptOss,
}

impl From<LayoutArg> for MxLayoutKind {
    fn from(l: LayoutArg) -> Self {
        match l {
            LayoutArg::Torchao => MxLayoutKind::Torchao,
            LayoutArg::GptOss => MxLayoutKind::GptOss,
        }
    }
}

/// Options of `mxmoe quantize`.
#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// Input safetensors file (bf16 or f32 expert weights `[E, N, K]`, and anything else).
    #[arg(value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Output safetensors file (replaced atomically when complete; may be the input file).
    #[arg(value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Layout of the MXFP4 tensors written: `torchao` (`<name>.packed` + `<name>.scales`) or
    /// `gpt-oss` (`<name>_blocks` + `<name>_scales`).
    #[arg(long, value_enum, default_value_t = LayoutArg::Torchao)]
    pub layout: LayoutArg,
    /// Quantize only these tensors (comma-separated names; each must be a bf16 or f32
    /// `[E, N, K]` tensor with K a multiple of 32). Default: every such tensor.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub tensors: Option<Vec<String>>,
}

/// Reads, quantizes and writes; prints one line per quantized tensor and a total.
pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let input = std::fs::read(&args.input)
        .with_context(|| format!("could not read {}", args.input.display()))?;
    let options = QuantizeOptions {
        layout: args.layout.into(),
        tensors: args.tensors.clone(),
        source: args
            .input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
    };
    let out = quantize_file(&input, &options)
        .with_context(|| format!("could not quantize {}", args.input.display()))?;
    write_atomic(&args.output, &out.bytes)?;

    let layout = MxLayoutKind::from(args.layout);
    for (name, from) in &out.converted {
        println!("{} MXFP4 ({from}) -> {layout} layout", escape(name));
    }
    if out.quantized.is_empty() {
        println!(
            "no tensor was quantized (none is a bf16 or f32 [E, N, K] tensor with K a multiple of 32); copied {} tensor(s)",
            out.copied.len()
        );
    }
    for q in &out.quantized {
        let [e, n, k] = q.shape;
        println!(
            "{} {} [{e}, {n}, {k}] -> {} + {} ({} -> {})",
            escape(&q.name),
            q.dtype,
            escape(&q.codes),
            escape(&q.scales),
            mib(q.bytes_in),
            mib(q.bytes_out)
        );
    }
    println!(
        "wrote {} ({} layout): {} tensor(s) quantized, {} converted, {} copied, {}",
        args.output.display(),
        layout,
        out.quantized.len(),
        out.converted.len(),
        out.copied.len(),
        mib(out.bytes.len())
    );
    Ok(())
}
