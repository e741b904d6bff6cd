//! `mxmoe run`: one operator call, forward and backward, on tensors read from a safetensors
//! file; the output and the gradients are written to another, so anyone can check mxmoe against
//! their own implementation.
//!
//! The file semantics (both modes, every check, the CPU reference and the GPU paths) are the
//! library's [`mxmoe::run_file`]; this front end parses the flags, chooses the backend (`--cpu`,
//! `--device`, or the CPU reference when there is no GPU, said so), prints the warnings and a
//! summary, and writes the output atomically (never over `--inputs`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use mxmoe::checkpoint::escape;
use mxmoe::run_file::{self, Backend, Problem, Ran, RunOptions, RunStrategy, Warning};

use crate::env::open_gpu;
use crate::output::{same_file, write_atomic};

/// What `mxmoe run --help` prints after the options: the file format, then how this front end
/// chooses the backend and writes the output.
pub fn format_help() -> String {
    format!(
        "{}\n\
Input file: --inputs; output file: --out. Without a GPU (and without --device), or with --cpu,
the CPU reference computes the result (bf16 rounding at the kernels' points, MXFP4 dequantized
exactly); --device N for a device that does not exist is an error. The output is written to a
temporary file beside --out and renamed over it when complete; --out may not be the --inputs
file.",
        run_file::FORMAT_HELP
    )
}

/// How the weights are multiplied (GPU only; the CPU reference computes the same math for all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// MXFP4 weights: the library's per-call choice (`op::Strategy::Auto`); dense weights: bf16.
    #[default]
    Auto,
    /// MXFP4 weights decoded inside the tensor-core K-loop (Strategy B).
    Fused,
    /// MXFP4 weights: the active experts dequantized to a compact bf16 buffer (Strategy A).
    Selective,
    /// Dense bf16 kernels (MXFP4 weights are dequantized to bf16 on the host first).
    Bf16,
}

impl From<StrategyArg> for RunStrategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Auto => RunStrategy::Auto,
            StrategyArg::Fused => RunStrategy::Fused,
            StrategyArg::Selective => RunStrategy::Selective,
            StrategyArg::Bf16 => RunStrategy::Bf16,
        }
    }
}

/// Options of `mxmoe run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Input safetensors file: expert_ids, x, the weights, optional LoRA, gates and dy; metadata
    /// mode, scaling, input_order, output_order, limit (details below).
    #[arg(long, value_name = "IN.safetensors")]
    pub inputs: PathBuf,
    /// Output safetensors file (bf16 out and the gradients d_<input name>; replaced atomically
    /// when complete; must not be the input file).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// How the weights are multiplied on the GPU: auto, fused (MXFP4 decoded in the K-loop),
    /// selective (active experts dequantized first) or bf16 (dense kernels). fused and selective
    /// need MXFP4 weights. Ignored by the CPU reference.
    #[arg(long, value_enum, default_value_t)]
    pub strategy: StrategyArg,
    /// CUDA device ordinal (an error if it does not exist). Default: device 0, or the CPU
    /// reference when there is no GPU.
    #[arg(long, value_name = "N")]
    pub device: Option<usize>,
    /// Compute with the CPU reference even when a GPU is present.
    #[arg(long)]
    pub cpu: bool,
    /// Accept MXFP4 scale byte 255 (E8M0 NaN) and let NaN propagate into out, d_x and d_gates,
    /// as torchao does. Default: such weights are refused, naming expert, row and block.
    #[arg(long)]
    pub allow_nan_scales: bool,
    /// Projection mode: name of the expert weights in the input file: NAME (dense),
    /// NAME.packed + NAME.scales (torchao) or NAME_blocks + NAME_scales (gpt-oss).
    #[arg(long, default_value = "w", value_name = "NAME")]
    pub weight: String,
}

/// Reads the input file, runs the call and writes the output file.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    if args.out == args.inputs || same_file(&args.out, &args.inputs) {
        bail!(
            "--out {} is the --inputs file; write the results to another file (the input would be replaced)",
            args.out.display()
        );
    }
    let input = std::fs::read(&args.inputs)
        .with_context(|| format!("could not read {}", args.inputs.display()))?;
    let options = RunOptions {
        strategy: args.strategy.into(),
        allow_nan_scales: args.allow_nan_scales,
        weight: args.weight.clone(),
    };
    let context = || format!("could not run {}", args.inputs.display());
    // The file is checked before a device is opened: a bad file is reported as such everywhere.
    let problem = Problem::parse(&input, &options).with_context(context)?;
    let gpu = if args.cpu {
        Err("--cpu was given".to_string())
    } else {
        open_gpu(args.device)?.map_err(|no| no.to_string())
    };
    let backend = match &gpu {
        Ok(rt) => Backend::Gpu(rt),
        Err(_) => Backend::CpuReference,
    };
    let output = problem.run(backend).with_context(context)?;
    for warning in &output.warnings {
        match warning {
            Warning::UnreadTensors(names) => {
                let names: Vec<String> = names.iter().map(|n| format!("`{}`", escape(n))).collect();
                eprintln!(
                    "warning: the call did not read {} tensor(s) of {}: {} (misnamed? see `mxmoe run --help` for the names it reads)",
                    names.len(),
                    args.inputs.display(),
                    names.join(", ")
                );
            }
            other => eprintln!("warning: {other}"),
        }
    }
    let bytes = output
        .to_bytes()
        .context("could not serialize the output file")?;
    write_atomic(&args.out, &bytes)?;
    println!("{}", output.problem);
    match (&output.ran, &gpu) {
        (
            Ran::Gpu {
                ordinal,
                device,
                strategy,
            },
            _,
        ) => println!("computed on cuda:{ordinal} ({device}), strategy {strategy}"),
        (Ran::CpuReference, why) => println!(
            "computed with the CPU reference ({}; bf16 rounding at the kernels' points, strategy ignored)",
            why.as_ref().err().map_or("as asked", String::as_str)
        ),
    }
    let list: Vec<String> = output
        .tensors
        .iter()
        .map(|t| format!("{} {:?}", t.name, t.shape))
        .collect();
    println!("wrote {}: {}", args.out.display(), list.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxmoe::checkpoint::{Checkpoint, CheckpointWriter, MxLayoutKind};
    use mxmoe::mxfp4::{dequantize_f32, quantize_mxfp4_bf16};
    use mxmoe::shared::bf16::{f32_to_bf16_bits, round_bf16};

    /// `mxmoe quantize` then `mxmoe run --cpu` through real files: the output equals the
    /// library's run on the dequantized (dense) weights, and the other tensors and the metadata
    /// survive quantization. (The library's own tests compare that run with the reference.)
    #[test]
    fn quantize_then_run_round_trip_through_files() {
        use crate::quantize::{FormatArg, LayoutArg, QuantizeArgs};
        let dir = std::env::temp_dir().join(format!("mxmoe-run-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (e, n, k, t, top_k) = (4, 32, 64, 5, 2);
        let w: Vec<f32> = (0..e * n * k)
            .map(|i| round_bf16(((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.5))
            .collect();
        let file = |weights: &dyn Fn(&mut CheckpointWriter)| {
            let mut f = CheckpointWriter::new();
            weights(&mut f);
            f.add_i64("expert_ids", &[t, top_k], &[0, 1, 2, 0, 1, -1, 2, 1, 0, 2])
                .unwrap();
            let x: Vec<f32> = (0..t * k).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
            f.add_bf16_from_f32("x", &[t, k], &x).unwrap();
            let dy: Vec<f32> = (0..t * top_k * n)
                .map(|i| (i % 13) as f32 / 6.0 - 1.0)
                .collect();
            f.add_bf16_from_f32("dy", &[t * top_k, n], &dy).unwrap();
            f.set_metadata("scaling", "0.75");
            f.set_metadata("output_order", "grouped");
            f.to_bytes().unwrap()
        };
        let raw = dir.join("raw.safetensors");
        std::fs::write(
            &raw,
            file(&|f| f.add_bf16_from_f32("w", &[e, n, k], &w).unwrap()),
        )
        .unwrap();
        let bits: Vec<u16> = w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        let mx_deq = dequantize_f32(&quantize_mxfp4_bf16(&bits, e, n, k).unwrap());
        let nv_deq = |two_level| {
            mxmoe::nvfp4::dequantize_nvfp4_f32(
                &mxmoe::nvfp4::quantize_nvfp4_bf16(&bits, e, n, k, two_level).unwrap(),
            )
        };
        let cases = [
            (FormatArg::Mxfp4, LayoutArg::Torchao, false, mx_deq.clone()),
            (FormatArg::Mxfp4, LayoutArg::GptOss, false, mx_deq),
            (FormatArg::Nvfp4, LayoutArg::Torchao, false, nv_deq(false)),
            (FormatArg::Nvfp4, LayoutArg::Torchao, true, nv_deq(true)),
        ];
        for (format, layout, two_level, deq) in cases {
            let dense = file(&|f| f.add_f32("w", &[e, n, k], &deq).unwrap());
            let want =
                run_file::run(&dense, &RunOptions::default(), Backend::CpuReference).unwrap();
            let quantized = dir.join("quantized.safetensors");
            crate::quantize::run(&QuantizeArgs {
                input: raw.clone(),
                output: quantized.clone(),
                layout,
                tensors: None,
                format,
                two_level,
                nv_export: None,
            })
            .unwrap();
            let q_bytes = std::fs::read(&quantized).unwrap();
            let q = Checkpoint::parse(&q_bytes).unwrap();
            assert!(!q.contains("w"));
            if format == FormatArg::Mxfp4 {
                assert_eq!(
                    q.metadata_value("mxmoe.layout"),
                    Some(MxLayoutKind::from(layout).name())
                );
            } else {
                assert_eq!(q.metadata_value("mxmoe.format"), Some("nvfp4"));
                assert_eq!(q.contains("w.tensor_scales"), two_level);
            }
            assert_eq!(q.metadata_value("scaling"), Some("0.75"));
            let out = dir.join("out.safetensors");
            run(&RunArgs {
                inputs: quantized.clone(),
                out: out.clone(),
                strategy: StrategyArg::Auto,
                device: None,
                cpu: true,
                weight: "w".into(),
                allow_nan_scales: false,
            })
            .unwrap();
            let got_bytes = std::fs::read(&out).unwrap();
            let got = Checkpoint::parse(&got_bytes).unwrap();
            assert_eq!(got.metadata_value("mxmoe.backend"), Some("cpu-reference"));
            assert_eq!(got.names().len(), want.tensors.len());
            for t in &want.tensors {
                let bits: Vec<u16> = t.values.iter().map(|&v| f32_to_bf16_bits(v)).collect();
                assert_eq!(
                    got.read_bf16(t.name).unwrap().data,
                    bits,
                    "{format:?} {layout:?}: tensor {}",
                    t.name
                );
            }
        }
        // --two-level is NVFP4's.
        let err = crate::quantize::run(&QuantizeArgs {
            input: raw.clone(),
            output: dir.join("never.safetensors"),
            layout: LayoutArg::Torchao,
            tensors: None,
            format: FormatArg::Mxfp4,
            two_level: true,
            nv_export: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("--two-level"), "{err}");
        // So is --nv-export.
        let err = crate::quantize::run(&QuantizeArgs {
            input: raw.clone(),
            output: dir.join("never.safetensors"),
            layout: LayoutArg::Torchao,
            tensors: None,
            format: FormatArg::Mxfp4,
            two_level: false,
            nv_export: Some(crate::quantize::NvExportArg::Modelopt),
        })
        .unwrap_err();
        assert!(err.to_string().contains("--nv-export"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
