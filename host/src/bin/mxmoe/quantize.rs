//! `mxmoe quantize`: MXFP4-quantizes (or, with `--format nvfp4`, NVFP4-quantizes) the expert
//! weights of a safetensors file ([`mxmoe::checkpoint::quantize_file`],
//! [`mxmoe::checkpoint::quantize_file_nvfp4`]).
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
//! With `--format nvfp4` every rank-3 `BF16`/`F32` tensor with `K` a multiple of 16 becomes
//! `<name>.packed` u8 `[E, N, K/2]`, `<name>.scales` F8_E4M3 `[E, N, K/16]` and, with
//! `--two-level`, `<name>.tensor_scales` f32 `[E]` (torchao 0.18.0's NVFP4 quantizer); `--layout`
//! applies to MXFP4 only. With `--two-level --nv-export modelopt|compressed-tensors` a tensor
//! `<prefix>.<proj>` is written as one linear per expert instead, `<prefix>.<e>.<proj>.weight`
//! (`.weight_packed`), `.weight_scale` and `.weight_scale_2` (`.weight_global_scale`), the names
//! those exporters give MoE layers (`mxmoe::checkpoint::add_nv_experts`).
//!
//! The output is written to a temporary file beside it and renamed over it when complete, so
//! `OUT` may be `IN`, and a failed run leaves `OUT` as it was.

use std::path::PathBuf;

use anyhow::Context as _;
use mxmoe::checkpoint::{
    MxLayoutKind, NvLayout, NvQuantizeOptions, QuantizeOptions, escape, quantize_file,
    quantize_file_nvfp4,
};

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

/// The per-expert NVFP4 exports `mxmoe quantize --nv-export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NvExportArg {
    /// NVIDIA ModelOpt: `{prefix}.{e}.{proj}.weight` u8 [N, K/2], `.weight_scale` F8_E4M3
    /// [N, K/16], `.weight_scale_2` f32 (the tensor scale).
    Modelopt,
    /// compressed-tensors: `.weight_packed`, `.weight_scale`, `.weight_global_scale` (the
    /// reciprocal of the tensor scale).
    CompressedTensors,
}

impl From<NvExportArg> for NvLayout {
    fn from(l: NvExportArg) -> Self {
        match l {
            NvExportArg::Modelopt => NvLayout::ModelOpt,
            NvExportArg::CompressedTensors => NvLayout::CompressedTensors,
        }
    }
}

/// The 4-bit formats `mxmoe quantize` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// MXFP4: E2M1 codes, one E8M0 scale per 32 values (`--layout` names the tensors).
    Mxfp4,
    /// NVFP4: E2M1 codes, one E4M3 scale per 16 values (+ a per-expert f32 scale with
    /// `--two-level`).
    Nvfp4,
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
    /// `[E, N, K]` tensor with K a multiple of 32, or of 16 for NVFP4). Default: every such
    /// tensor.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub tensors: Option<Vec<String>>,
    /// The 4-bit format to write.
    #[arg(long, value_enum, default_value_t = FormatArg::Mxfp4)]
    pub format: FormatArg,
    /// NVFP4 only: also write each expert's per-tensor f32 scale (two-level scaling, as ModelOpt
    /// exports).
    #[arg(long)]
    pub two_level: bool,
    /// NVFP4 only (with `--two-level`): write each quantized tensor `<prefix>.<proj>` `[E, N, K]`
    /// as one linear per expert, `<prefix>.<e>.<proj>.*`, in ModelOpt's or compressed-tensors'
    /// names, instead of the stacked `<name>.packed` / `.scales` / `.tensor_scales`.
    #[arg(long, value_enum, value_name = "EXPORT")]
    pub nv_export: Option<NvExportArg>,
}

/// Reads, quantizes and writes; prints one line per quantized tensor and a total.
pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let input = std::fs::read(&args.input)
        .with_context(|| format!("could not read {}", args.input.display()))?;
    let source = args
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    if args.format == FormatArg::Nvfp4 {
        let options = NvQuantizeOptions {
            two_level: args.two_level,
            tensors: args.tensors.clone(),
            source,
            export: args.nv_export.map(NvLayout::from),
        };
        let out = quantize_file_nvfp4(&input, &options)
            .with_context(|| format!("could not quantize {}", args.input.display()))?;
        write_atomic(&args.output, &out.bytes)?;
        for q in &out.quantized {
            let [e, n, k] = q.shape;
            println!(
                "{} {} [{e}, {n}, {k}] -> {} + {}{} ({} -> {})",
                escape(&q.name),
                q.dtype,
                escape(&q.codes),
                escape(&q.scales),
                match (args.nv_export, args.two_level) {
                    (Some(_), _) => " + a tensor scale, per expert",
                    (None, true) => " + tensor_scales",
                    (None, false) => "",
                },
                mib(q.bytes_in),
                mib(q.bytes_out)
            );
        }
        println!(
            "wrote {} (NVFP4{}): {} tensor(s) quantized, {} copied, {}",
            args.output.display(),
            if args.two_level { ", two-level" } else { "" },
            out.quantized.len(),
            out.copied.len(),
            mib(out.bytes.len())
        );
        return Ok(());
    }
    if args.two_level {
        anyhow::bail!("--two-level applies to --format nvfp4 only (MXFP4 has one scale level)");
    }
    if args.nv_export.is_some() {
        anyhow::bail!("--nv-export applies to --format nvfp4 only");
    }
    let options = QuantizeOptions {
        layout: args.layout.into(),
        tensors: args.tensors.clone(),
        source,
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
