//! The file semantics against the CPU reference called directly (moved here from the CLI's
//! `run.rs` with the logic): every row order, dense and MXFP4 weights in both layouts, the block,
//! and one message per kind of bad input.

use super::*;
use crate::checkpoint::{Dtype, MxLayoutKind};
use crate::mxfp4::{dequantize_f32, quantize_mxfp4_bf16};
use crate::nvfp4::{NvError, NvWeights, dequantize_nvfp4_f32, quantize_nvfp4};
use crate::reference::LinearProblem;
use crate::reference::moe::{
    Activation, ClampBoundary, GateUpLayout, MoeProblem, RefLora, moe_forward, moe_forward_backward,
};
use crate::shared::bf16::{f32_to_bf16_bits, round_bf16};

/// Parses `input`, runs it on the CPU reference and serializes the result.
fn execute(input: &[u8], options: &RunOptions) -> Result<(Vec<u8>, RunOutput)> {
    let out = run(input, options, Backend::CpuReference)?;
    Ok((out.to_bytes()?, out))
}

/// Deterministic values in `[-scale, scale)`, rounded to bf16.
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            round_bf16(((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect()
}

/// One test problem, held as the values the file will hold.
struct Case {
    e: usize,
    n: usize,
    k: usize,
    t: usize,
    top_k: usize,
    r: usize,
    ids: Vec<i64>,
    input: RowOrder,
    output: RowOrder,
    gates: bool,
    w: Vec<f32>,
}

impl Case {
    fn new(input: RowOrder, output: RowOrder, gates: bool) -> Self {
        let (e, n, k, t, top_k, r) = (4, 32, 64, 5, 2, 3);
        // Expert 3 gets no rows; token 2's second slot is dropped.
        let ids = vec![0, 1, 2, 0, 1, -1, 2, 1, 0, 2];
        Case {
            e,
            n,
            k,
            t,
            top_k,
            r,
            ids,
            input,
            output,
            gates,
            w: values(e * n * k, 1, 0.5),
        }
    }

    fn x_rows(&self) -> usize {
        match self.input {
            RowOrder::Scattered => self.t,
            RowOrder::Grouped => self.t * self.top_k,
        }
    }

    fn out_rows(&self) -> usize {
        if self.gates {
            self.t
        } else {
            self.t * self.top_k
        }
    }

    /// The input file; `weights` adds the weight tensors.
    fn file(&self, weights: impl FnOnce(&mut CheckpointWriter)) -> Vec<u8> {
        let mut f = CheckpointWriter::new();
        weights(&mut f);
        f.add_i32(
            "expert_ids",
            &[self.t, self.top_k],
            &self.ids.iter().map(|&v| v as i32).collect::<Vec<_>>(),
        )
        .unwrap();
        f.add_bf16_from_f32(
            "x",
            &[self.x_rows(), self.k],
            &values(self.x_rows() * self.k, 2, 1.0),
        )
        .unwrap();
        f.add_bf16_from_f32(
            "lora_a",
            &[self.e * self.r, self.k],
            &values(self.e * self.r * self.k, 3, 0.2),
        )
        .unwrap();
        f.add_f32(
            "lora_b",
            &[self.n, self.e * self.r],
            &values(self.n * self.e * self.r, 4, 0.2),
        )
        .unwrap();
        if self.gates {
            f.add_bf16_from_f32(
                "gates",
                &[self.t, self.top_k],
                &values(self.t * self.top_k, 5, 1.0),
            )
            .unwrap();
        }
        f.add_bf16_from_f32(
            "dy",
            &[self.out_rows(), self.n],
            &values(self.out_rows() * self.n, 6, 1.0),
        )
        .unwrap();
        f.set_metadata("scaling", "0.75");
        f.set_metadata("input_order", self.input.name());
        f.set_metadata("output_order", self.output.name());
        f.to_bytes().unwrap()
    }

    /// The reference called directly on dense weights `w`, outputs bf16-rounded into the
    /// file layout: (name, values).
    fn expected(&self, w: &[f32]) -> Vec<(&'static str, Vec<u16>)> {
        let routing = reference::flatten_sort_count(&self.ids, self.t, self.top_k, self.e).unwrap();
        let valid = routing.num_rows();
        let x = values(self.x_rows() * self.k, 2, 1.0);
        let (a, b) = (
            values(self.e * self.r * self.k, 3, 0.2),
            values(self.n * self.e * self.r, 4, 0.2),
        );
        let gates = values(self.t * self.top_k, 5, 1.0);
        let dy = values(self.out_rows() * self.n, 6, 1.0);
        let grouped_in = self.input == RowOrder::Grouped;
        let p = LinearProblem {
            x: if grouped_in { &x[..valid * self.k] } else { &x },
            x_rows: if grouped_in { valid } else { self.t },
            w,
            num_experts: self.e,
            n: self.n,
            k: self.k,
            lora_a: &a,
            lora_b: &b,
            rank: self.r,
            scaling: 0.75,
            fan_out: if grouped_in { 1 } else { self.top_k },
            input_order: self.input,
            output_order: self.output,
            gates: self.gates.then_some(&gates[..]),
            bias: None,
        };
        let fwd = reference::linear_forward(&p, &routing, Rounding::Bf16).unwrap();
        let grouped_out = !self.gates && self.output == RowOrder::Grouped;
        let dy_ref = if grouped_out {
            &dy[..valid * self.n]
        } else {
            &dy[..]
        };
        let g = reference::linear_backward(&p, &routing, dy_ref, Rounding::Bf16).unwrap();
        let bits = |v: Vec<f32>, len: usize| {
            let mut b: Vec<u16> = v.iter().map(|&x| f32_to_bf16_bits(x)).collect();
            b.resize(len, 0);
            b
        };
        let mut want = vec![
            (
                "out",
                bits(fwd.y.unwrap_or(fwd.out), self.out_rows() * self.n),
            ),
            ("d_x", bits(g.dx, self.x_rows() * self.k)),
            ("d_lora_a", bits(g.da, self.e * self.r * self.k)),
            ("d_lora_b", bits(g.db, self.n * self.e * self.r)),
        ];
        if let Some(dg) = g.d_gates {
            want.push(("d_gates", bits(dg, self.t * self.top_k)));
        }
        want
    }
}

fn cpu() -> RunOptions {
    RunOptions::default()
}

fn check_outputs(bytes: &[u8], want: &[(&'static str, Vec<u16>)]) {
    let ck = Checkpoint::parse(bytes).unwrap();
    let names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    let mut have = ck.names();
    have.sort_by_key(|n| names.iter().position(|m| m == n));
    assert_eq!(have, names);
    for (name, bits) in want {
        let got = ck.read_bf16(name).unwrap();
        assert_eq!(&got.data, bits, "tensor {name}");
    }
    assert_eq!(ck.metadata_value("mxmoe.backend"), Some("cpu-reference"));
}

#[test]
fn cpu_run_matches_the_reference_called_directly() {
    let cases = [
        Case::new(RowOrder::Scattered, RowOrder::Grouped, false),
        Case::new(RowOrder::Grouped, RowOrder::Scattered, true),
        Case::new(RowOrder::Grouped, RowOrder::Grouped, false),
        Case::new(RowOrder::Scattered, RowOrder::Scattered, false),
    ];
    for case in cases {
        // Dense bf16 weights.
        let file = case.file(|f| {
            f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
                .unwrap()
        });
        let (bytes, report) = execute(&file, &cpu()).unwrap();
        assert_eq!(report.ran, Ran::CpuReference);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        check_outputs(&bytes, &case.expected(&case.w));

        // MXFP4 weights in both layouts: the reference on the dequantized weights.
        let bits: Vec<u16> = case.w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        let mx = quantize_mxfp4_bf16(&bits, case.e, case.n, case.k).unwrap();
        let want = case.expected(&dequantize_f32(&mx));
        for layout in MxLayoutKind::ALL {
            let file = case.file(|f| f.add_mx("w", &mx, layout).unwrap());
            let (bytes, _) = execute(
                &file,
                &RunOptions {
                    strategy: RunStrategy::Fused,
                    ..cpu()
                },
            )
            .unwrap();
            check_outputs(&bytes, &want);
        }
    }
}

/// Writes stacked NVFP4 weights `w` under `name` (`.packed`, `.scales` as F8_E4M3 and, with
/// tensor scales, `.tensor_scales` `[E]` or `[E, G]`).
fn add_nv(f: &mut CheckpointWriter, name: &str, w: &NvWeights) {
    let s = w.shape();
    let (e, n, k) = (s.experts(), s.n(), s.k());
    f.add_u8(format!("{name}.packed"), &[e, n, k / 2], w.packed())
        .unwrap();
    f.add_bytes(
        format!("{name}.scales"),
        Dtype::F8_E4M3,
        &[e, n, k / 16],
        w.scales().to_vec(),
    )
    .unwrap();
    if let Some(t) = w.tensor_scales() {
        let shape: Vec<usize> = if w.groups() == 1 {
            vec![e]
        } else {
            vec![e, w.groups()]
        };
        f.add_f32(format!("{name}.tensor_scales"), &shape, t)
            .unwrap();
    }
}

#[test]
fn nvfp4_weights_run_on_the_reference_and_fused_needs_k_a_multiple_of_32() {
    let case = Case::new(RowOrder::Grouped, RowOrder::Scattered, true);
    let single = quantize_nvfp4(&case.w, case.e, case.n, case.k, false).unwrap();
    let two_level = quantize_nvfp4(&case.w, case.e, case.n, case.k, true).unwrap();
    // Two tensor-scale groups per expert, with scales of their own.
    let (shape, packed, scales, _) = two_level.clone().into_parts();
    let grouped = NvWeights::from_grouped_parts(
        shape,
        packed,
        scales,
        Some((0..case.e * 2).map(|i| 0.01 * (1.0 + i as f32)).collect()),
        2,
    )
    .unwrap();
    for w in [&single, &two_level, &grouped] {
        let file = case.file(|f| add_nv(f, "w", w));
        for strategy in [
            RunStrategy::Auto,
            RunStrategy::Selective,
            RunStrategy::Fused,
            RunStrategy::Bf16,
        ] {
            let (bytes, report) = execute(&file, &RunOptions { strategy, ..cpu() }).unwrap();
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
            check_outputs(&bytes, &case.expected(&dequantize_nvfp4_f32(w)));
            let ck = Checkpoint::parse(&bytes).unwrap();
            assert!(
                ck.metadata_value(META_WEIGHTS)
                    .is_some_and(|v| v.starts_with("NVFP4")),
                "{:?}",
                ck.metadata_value(META_WEIGHTS)
            );
        }
    }
    // K = 48 (a multiple of 16, not of 32): `fused` is refused, `auto` runs.
    let mut k48 = Case::new(RowOrder::Grouped, RowOrder::Scattered, true);
    k48.k = 48;
    k48.w = values(k48.e * k48.n * k48.k, 1, 0.5);
    let w48 = quantize_nvfp4(&k48.w, k48.e, k48.n, k48.k, true).unwrap();
    let file = k48.file(|f| add_nv(f, "w", &w48));
    let err = execute(
        &file,
        &RunOptions {
            strategy: RunStrategy::Fused,
            ..cpu()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { what: "strategy", detail } if detail.contains("NVFP4") && detail.contains("K % 32")),
        "{err}"
    );
    let (bytes, _) = execute(
        &file,
        &RunOptions {
            strategy: RunStrategy::Auto,
            ..cpu()
        },
    )
    .unwrap();
    check_outputs(&bytes, &k48.expected(&dequantize_nvfp4_f32(&w48)));
    // E4M3 NaN block scales and tensor scales of a wrong shape are typed errors.
    let mut nan = single.clone().into_parts();
    nan.2[3] = 0x7F;
    let bad = NvWeights::from_parts(nan.0, nan.1, vec![0x38; nan.2.len()], None).unwrap();
    let file = case.file(|f| {
        let s = bad.shape();
        f.add_u8("w.packed", &[s.experts(), s.n(), s.k() / 2], bad.packed())
            .unwrap();
        f.add_bytes(
            "w.scales",
            Dtype::F8_E4M3,
            &[s.experts(), s.n(), s.k() / 16],
            nan.2.clone(),
        )
        .unwrap();
    });
    assert!(matches!(
        execute(&file, &cpu()),
        Err(Error::Nv(NvError::BadBlockScale { byte: 0x7F, .. }))
    ));
    let file = case.file(|f| {
        add_nv(f, "w", &single);
        f.add_f32("w.tensor_scales", &[case.e + 1], &vec![1.0; case.e + 1])
            .unwrap();
    });
    assert!(matches!(
        execute(&file, &cpu()),
        Err(Error::Checkpoint {
            kind: CheckpointErrorKind::Shape,
            ..
        })
    ));
}

#[test]
fn run_without_dy_or_lora_writes_the_forward_only() {
    let case = Case::new(RowOrder::Scattered, RowOrder::Scattered, false);
    let mut f = CheckpointWriter::new();
    f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
        .unwrap();
    f.add_i64("expert_ids", &[case.t, case.top_k], &case.ids)
        .unwrap();
    f.add_f32(
        "x",
        &[case.t * case.top_k, case.k],
        &values(case.t * case.top_k * case.k, 2, 1.0),
    )
    .unwrap();
    let (bytes, report) = execute(&f.to_bytes().unwrap(), &cpu()).unwrap();
    assert!(report.problem.contains("forward only"));
    let ck = Checkpoint::parse(&bytes).unwrap();
    assert_eq!(ck.names(), ["out"]);
    let out = ck.read_bf16("out").unwrap();
    assert_eq!(out.shape, [case.t * case.top_k, case.n]);
    // The dropped slot's row is zero.
    assert!(out.data[5 * case.n..6 * case.n].iter().all(|&b| b == 0));
}

#[test]
fn bad_inputs_give_one_sentence_naming_the_problem() {
    let case = Case::new(RowOrder::Scattered, RowOrder::Scattered, true);
    let dense = |f: &mut CheckpointWriter| {
        f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
            .unwrap()
    };
    let good = case.file(dense);
    let fails = |bytes: &[u8], options: &RunOptions, needle: &str| {
        let e = execute(bytes, options).expect_err("expected an error");
        let msg = e.to_string();
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    };
    // Dense weights cannot run an MXFP4 strategy.
    fails(
        &good,
        &RunOptions {
            strategy: RunStrategy::Selective,
            ..cpu()
        },
        "needs MXFP4 weights",
    );
    // A missing weight names what was looked for.
    fails(
        &good,
        &RunOptions {
            weight: "v".into(),
            ..cpu()
        },
        "`v.packed`",
    );

    let edit = |drop: &str, f: &dyn Fn(&mut CheckpointWriter)| {
        let ck = Checkpoint::parse(&good).unwrap();
        let mut out = CheckpointWriter::new();
        for name in ck.names() {
            if name != drop {
                out.add_view(name, &ck.view(name).unwrap()).unwrap();
            }
        }
        for (k, v) in ck.metadata() {
            if k != drop {
                out.set_metadata(k.clone(), v.clone());
            }
        }
        f(&mut out);
        out.to_bytes().unwrap()
    };
    let none = |_: &mut CheckpointWriter| {};
    fails(&edit("x", &none), &cpu(), "`x` is not in the file");
    fails(&edit("lora_b", &none), &cpu(), "`lora_b` is missing");
    fails(
        &edit("scaling", &none),
        &cpu(),
        "metadata: `scaling` is missing",
    );
    fails(
        &edit("output_order", &|f| {
            f.set_metadata("output_order", "grouped")
        }),
        &cpu(),
        "`gates` need output_order = scattered",
    );
    fails(
        &edit("input_order", &|f| f.set_metadata("input_order", "sorted")),
        &cpu(),
        "`input_order`",
    );
    fails(
        &edit("dy", &|f| {
            f.add_bf16_from_f32("dy", &[10, 32], &[0.0; 320]).unwrap()
        }),
        &cpu(),
        "`dy`",
    );
    fails(
        &edit("expert_ids", &|f| {
            f.add_i64("expert_ids", &[5, 2], &[0, 1, 2, 0, 1, 4, 2, 1, 0, 2])
                .unwrap()
        }),
        &cpu(),
        "expert 4",
    );
    fails(
        &edit("expert_ids", &|f| {
            f.add_f32("expert_ids", &[5, 2], &[0.0; 10]).unwrap()
        }),
        &cpu(),
        "`expert_ids` is F32",
    );
    fails(
        &edit("x", &|f| {
            f.add_bf16_from_f32("x", &[5, 48], &[0.0; 240]).unwrap()
        }),
        &cpu(),
        "`x` has 48 columns",
    );
    fails(&good[..good.len() - 7], &cpu(), "`x`");
}

/// What a block-mode test file holds besides the tensors every block file has, and what the
/// reference called directly runs.
struct BlockSpec {
    /// Metadata besides `mode` and the scalings.
    meta: Vec<(&'static str, String)>,
    /// The activation and layout of the direct reference call.
    activation: Activation,
    layout: GateUpLayout,
    /// `gate_up_bias [E, 2I]` and `down_bias [E, H]`.
    biases: bool,
    /// `dy` (else the file is forward only).
    dy: bool,
}

impl BlockSpec {
    /// SwiGLU with a clamp limit, no biases (the block mode from before gpt-oss).
    fn swiglu() -> Self {
        BlockSpec {
            meta: vec![("limit", "0.75".into())],
            activation: Activation::SwiGlu { limit: Some(0.75) },
            layout: GateUpLayout::Split,
            biases: false,
            dy: true,
        }
    }

    /// gpt-oss's block with its defaults (only `activation = gpt_oss` in the metadata) and both
    /// biases.
    fn gpt_oss() -> Self {
        BlockSpec {
            meta: vec![("activation", "gpt_oss".into())],
            activation: Activation::GPT_OSS,
            layout: GateUpLayout::Interleaved,
            biases: true,
            dy: true,
        }
    }
}

/// A block-mode test file and the reference block called directly on the same values.
struct BlockCase {
    file: Vec<u8>,
    /// The outputs the file run must give: (name, bf16 bits).
    want: Vec<(&'static str, Vec<u16>)>,
    /// The reference's gate/up output `[L_valid, 2I]` (independent of the activation).
    gu: Vec<f32>,
}

/// Block dimensions of the test files: E, H, I, T, k, r.
const BLOCK_DIMS: (usize, usize, usize, usize, usize, usize) = (4, 64, 32, 5, 2, 2);

/// A block-mode input file: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]` (dense, or
/// quantized in `layout`), LoRA on both projections with different scalings, a dropped slot, and
/// what `spec` adds; and the reference block called directly on the same values.
fn block_file(layout: Option<MxLayoutKind>, spec: &BlockSpec) -> BlockCase {
    let (e, h, i, t, top_k, r) = BLOCK_DIMS;
    let ids: Vec<i64> = vec![0, 1, 2, 0, 1, -1, 2, 1, 0, 3];
    let gu = values(e * 2 * i * h, 11, 0.3);
    let dn = values(e * h * i, 12, 0.3);
    let x = values(t * h, 13, 1.0);
    let gates = values(t * top_k, 14, 1.0);
    let dy = values(t * h, 15, 1.0);
    let (gua, gub) = (values(e * r * h, 16, 0.2), values(2 * i * e * r, 17, 0.2));
    let (dna, dnb) = (values(e * r * i, 18, 0.2), values(h * e * r, 19, 0.2));
    let (gu_bias, dn_bias) = (values(e * 2 * i, 20, 0.5), values(e * h, 21, 0.5));
    let mut f = CheckpointWriter::new();
    let (gu_ref, dn_ref) = match layout {
        None => {
            f.add_bf16_from_f32("gate_up_proj", &[e, 2 * i, h], &gu)
                .unwrap();
            f.add_f32("down_proj", &[e, h, i], &dn).unwrap();
            (gu.clone(), dn.clone())
        }
        Some(layout) => {
            let q = |v: &[f32], n: usize, k: usize| {
                let bits: Vec<u16> = v.iter().map(|&x| f32_to_bf16_bits(x)).collect();
                quantize_mxfp4_bf16(&bits, e, n, k).unwrap()
            };
            let (qgu, qdn) = (q(&gu, 2 * i, h), q(&dn, h, i));
            f.add_mx("gate_up_proj", &qgu, layout).unwrap();
            f.add_mx("down_proj", &qdn, layout).unwrap();
            (dequantize_f32(&qgu), dequantize_f32(&qdn))
        }
    };
    f.add_i64("expert_ids", &[t, top_k], &ids).unwrap();
    f.add_bf16_from_f32("x", &[t, h], &x).unwrap();
    f.add_bf16_from_f32("gates", &[t, top_k], &gates).unwrap();
    if spec.dy {
        f.add_bf16_from_f32("dy", &[t, h], &dy).unwrap();
    }
    f.add_bf16_from_f32("gate_up_lora_a", &[e * r, h], &gua)
        .unwrap();
    f.add_bf16_from_f32("gate_up_lora_b", &[2 * i, e * r], &gub)
        .unwrap();
    f.add_bf16_from_f32("down_lora_a", &[e * r, i], &dna)
        .unwrap();
    f.add_bf16_from_f32("down_lora_b", &[h, e * r], &dnb)
        .unwrap();
    if spec.biases {
        // One in f32, one in bf16: both are read as floats.
        f.add_f32("gate_up_bias", &[e, 2 * i], &gu_bias).unwrap();
        f.add_bf16_from_f32("down_bias", &[e, h], &dn_bias).unwrap();
    }
    f.set_metadata("mode", "block");
    f.set_metadata("scaling", "0.5");
    f.set_metadata("down_scaling", "1.5");
    for (key, value) in &spec.meta {
        f.set_metadata(*key, value.clone());
    }

    let routing = reference::flatten_sort_count(&ids, t, top_k, e).unwrap();
    let p = MoeProblem {
        x: &x,
        num_experts: e,
        hidden: h,
        intermediate: i,
        gate_up: &gu_ref,
        down: &dn_ref,
        lora_gate_up: Some(RefLora {
            a: &gua,
            b: &gub,
            rank: r,
            scaling: 0.5,
        }),
        lora_down: Some(RefLora {
            a: &dna,
            b: &dnb,
            rank: r,
            scaling: 1.5,
        }),
        gates: &gates,
        activation: spec.activation,
        layout: spec.layout,
        gate_up_bias: spec.biases.then_some(&gu_bias[..]),
        down_bias: spec.biases.then_some(&dn_bias[..]),
    };
    let bits = |v: Vec<f32>| v.iter().map(|&x| f32_to_bf16_bits(x)).collect::<Vec<u16>>();
    if !spec.dy {
        let fwd = moe_forward(&p, &routing, Rounding::Bf16).unwrap();
        return BlockCase {
            file: f.to_bytes().unwrap(),
            want: vec![("out", bits(fwd.y))],
            gu: fwd.gu,
        };
    }
    let (fwd, g) = moe_forward_backward(&p, &routing, &dy, Rounding::Bf16).unwrap();
    let (gul, dnl) = (g.gate_up.unwrap(), g.down.unwrap());
    let want = vec![
        ("out", bits(fwd.y)),
        ("d_x", bits(g.dx)),
        ("d_gates", bits(g.d_gates)),
        ("d_gate_up_lora_a", bits(gul.da)),
        ("d_gate_up_lora_b", bits(gul.db)),
        ("d_down_lora_a", bits(dnl.da)),
        ("d_down_lora_b", bits(dnl.db)),
    ];
    BlockCase {
        file: f.to_bytes().unwrap(),
        want,
        gu: fwd.gu,
    }
}

/// The SwiGLU block file of [`BlockSpec::swiglu`] and its expected outputs.
fn block_case(layout: Option<MxLayoutKind>) -> (Vec<u8>, Vec<(&'static str, Vec<u16>)>) {
    let c = block_file(layout, &BlockSpec::swiglu());
    (c.file, c.want)
}

/// `file` with the tensors and metadata keys in `drop` left out, then `add` applied.
fn rewrite(file: &[u8], drop: &[&str], add: &dyn Fn(&mut CheckpointWriter)) -> Vec<u8> {
    let ck = Checkpoint::parse(file).unwrap();
    let mut out = CheckpointWriter::new();
    for name in ck.names() {
        if !drop.contains(&name) {
            out.add_view(name, &ck.view(name).unwrap()).unwrap();
        }
    }
    for (k, v) in ck.metadata() {
        if !drop.contains(&k.as_str()) {
            out.set_metadata(k.clone(), v.clone());
        }
    }
    add(&mut out);
    out.to_bytes().unwrap()
}

/// The kind and message of the checkpoint error `Problem::parse` gives for `file`.
fn file_error_of(file: &[u8]) -> (CheckpointErrorKind, String) {
    match Problem::parse(file, &cpu()) {
        Err(e @ Error::Checkpoint { kind, .. }) => (kind, e.to_string()),
        Err(other) => panic!("expected a checkpoint error, got {other}"),
        Ok(p) => panic!("expected a checkpoint error, parsed {}", p.describe()),
    }
}

#[test]
fn cpu_block_run_matches_the_reference_block() {
    for layout in [
        None,
        Some(MxLayoutKind::Torchao),
        Some(MxLayoutKind::GptOss),
    ] {
        let (file, want) = block_case(layout);
        let (bytes, report) = execute(&file, &cpu()).unwrap();
        assert!(report.problem.contains("MoE block"), "{}", report.problem);
        check_outputs(&bytes, &want);
        let ck = Checkpoint::parse(&bytes).unwrap();
        assert_eq!(ck.metadata_value("mxmoe.mode"), Some("block"));
    }
}

#[test]
fn bad_block_inputs_name_the_tensor() {
    let (good, _) = block_case(None);
    let ck = Checkpoint::parse(&good).unwrap();
    let without = |drop: &str| {
        let mut out = CheckpointWriter::new();
        for name in ck.names() {
            if name != drop {
                out.add_view(name, &ck.view(name).unwrap()).unwrap();
            }
        }
        for (k, v) in ck.metadata() {
            if k != drop {
                out.set_metadata(k.clone(), v.clone());
            }
        }
        out.to_bytes().unwrap()
    };
    for (drop, needle) in [
        ("gates", "`gates` is not in the file"),
        ("down_proj", "`down_proj.packed`"),
        ("down_lora_b", "`down_lora_b` is missing"),
    ] {
        let msg = execute(&without(drop), &cpu()).unwrap_err().to_string();
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    let msg = execute(
        &good,
        &RunOptions {
            strategy: RunStrategy::Fused,
            ..cpu()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("`gate_up_proj` is dense"), "{msg}");
}

/// gpt-oss's block (`activation = gpt_oss`, defaults, both biases) through the file on the CPU
/// equals `moe_forward_backward` called directly with `Activation::GPT_OSS`, interleaved rows
/// and the biases: dense weights and MXFP4 in both layouts, forward + backward and forward only.
/// SwiGLU takes the biases too.
#[test]
fn cpu_gpt_oss_block_run_matches_the_reference_block() {
    for layout in [
        None,
        Some(MxLayoutKind::Torchao),
        Some(MxLayoutKind::GptOss),
    ] {
        let case = block_file(layout, &BlockSpec::gpt_oss());
        let (bytes, report) = execute(&case.file, &cpu()).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        for needle in [
            "one MoE block",
            "gpt-oss activation (alpha 1.702, limit 7, strict clamp boundary, interleaved gate/up rows)",
            "gate_up and down biases",
        ] {
            assert!(report.problem.contains(needle), "{}", report.problem);
        }
        check_outputs(&bytes, &case.want);
    }
    // The gpt-oss activation really ran: the SwiGLU reading of the same file differs.
    let gpt = block_file(None, &BlockSpec::gpt_oss());
    let swiglu_reading = BlockSpec {
        activation: Activation::SwiGlu { limit: None },
        layout: GateUpLayout::Split,
        ..BlockSpec::gpt_oss()
    };
    assert_ne!(gpt.want[0], block_file(None, &swiglu_reading).want[0]);

    let forward_only = block_file(
        Some(MxLayoutKind::GptOss),
        &BlockSpec {
            dy: false,
            ..BlockSpec::gpt_oss()
        },
    );
    let (bytes, report) = execute(&forward_only.file, &cpu()).unwrap();
    assert!(
        report.problem.contains("forward only"),
        "{}",
        report.problem
    );
    check_outputs(&bytes, &forward_only.want);

    let swiglu_biases = block_file(
        None,
        &BlockSpec {
            biases: true,
            ..BlockSpec::swiglu()
        },
    );
    let (bytes, report) = execute(&swiglu_biases.file, &cpu()).unwrap();
    assert!(
        report
            .problem
            .contains(", limit 0.75, gate_up and down biases"),
        "{}",
        report.problem
    );
    check_outputs(&bytes, &swiglu_biases.want);
}

/// Explicit `alpha`, `limit` and `clamp_boundary` reach the activation. The limit is a value
/// the gate/up output takes exactly at a gate column, so the boundary rule decides a gradient:
/// `strict` and `inclusive` give different `d_x`, each the reference's with that rule.
#[test]
fn gpt_oss_parameters_and_clamp_boundary_reach_the_activation() {
    let (_, _, i, ..) = BLOCK_DIMS;
    let gu = block_file(None, &BlockSpec::gpt_oss()).gu;
    // Gate columns are the even ones; the reference's `gu` is bf16, so the value is exact.
    let tie = gu
        .chunks_exact(2 * i)
        .flat_map(|row| row.iter().step_by(2))
        .copied()
        .find(|&g| g > 0.25)
        .expect("a positive gate value");
    let mut d_x = Vec::new();
    for boundary in ClampBoundary::ALL {
        let spec = BlockSpec {
            meta: vec![
                ("activation", "gpt_oss".into()),
                ("alpha", "1.25".into()),
                ("limit", tie.to_string()),
                ("clamp_boundary", boundary.to_string()),
            ],
            activation: Activation::GptOss {
                alpha: 1.25,
                limit: tie,
                boundary,
            },
            ..BlockSpec::gpt_oss()
        };
        let case = block_file(None, &spec);
        let (bytes, out) = execute(&case.file, &cpu()).unwrap();
        check_outputs(&bytes, &case.want);
        let want_describe = format!(
            "(alpha 1.25, limit {tie}, {boundary} clamp boundary, interleaved gate/up rows)"
        );
        assert!(out.problem.contains(&want_describe), "{}", out.problem);
        assert_eq!(
            out.metadata.get(META_CLAMP_BOUNDARY).map(String::as_str),
            Some(boundary.name())
        );
        d_x.push(case.want[1].1.clone());
    }
    assert_ne!(d_x[0], d_x[1], "the tie at the limit must change d_x");
}

/// With `activation = gpt_oss` the output records the activation's values, defaults filled in;
/// a SwiGLU block's output metadata is unchanged (no such keys).
#[test]
fn gpt_oss_block_output_metadata_records_the_activation() {
    let case = block_file(None, &BlockSpec::gpt_oss());
    let (bytes, _) = execute(&case.file, &cpu()).unwrap();
    let ck = Checkpoint::parse(&bytes).unwrap();
    for (key, value) in [
        ("activation", "gpt_oss"),
        (META_MODE, "block"),
        (META_BACKEND, "cpu-reference"),
        (META_STRATEGY, "reference"),
        (
            META_WEIGHTS,
            "gate_up BF16 [4, 64, 64], down F32 [4, 64, 32]",
        ),
        (META_ACTIVATION, "gpt_oss"),
        (META_ALPHA, "1.702"),
        (META_LIMIT, "7"),
        (META_CLAMP_BOUNDARY, "strict"),
    ] {
        assert_eq!(ck.metadata_value(key), Some(value), "{key}");
    }
    let (swiglu, _) = block_case(None);
    let (bytes, out) = execute(&swiglu, &cpu()).unwrap();
    let ck = Checkpoint::parse(&bytes).unwrap();
    for key in [META_ACTIVATION, META_ALPHA, META_LIMIT, META_CLAMP_BOUNDARY] {
        assert_eq!(ck.metadata_value(key), None, "{key}");
    }
    let mut keys: Vec<&str> = out.metadata.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "down_scaling",
            "limit",
            "mode",
            META_BACKEND,
            META_DEVICE,
            META_MODE,
            META_STRATEGY,
            META_VERSION,
            META_WEIGHTS,
            "scaling"
        ]
    );
    assert!(FORMAT_HELP.contains("clamp_boundary") && !FORMAT_HELP.contains("not gpt-oss"));
}

/// Bad biases and bad activation metadata are typed checkpoint errors naming the tensor or key.
#[test]
fn bad_gpt_oss_block_inputs_are_typed_errors() {
    let (e, h, i, ..) = BLOCK_DIMS;
    let good = block_file(None, &BlockSpec::gpt_oss()).file;
    let swiglu = block_case(None).0;
    let shape = CheckpointErrorKind::Shape;
    let metadata = CheckpointErrorKind::Metadata;
    let bias = |name: &'static str, dims: Vec<usize>| {
        let len = dims.iter().product();
        rewrite(&good, &[name], &move |f| {
            f.add_bf16_from_f32(name, &dims, &values(len, 30, 0.5))
                .unwrap()
        })
    };
    let meta = |file: &[u8], key: &'static str, value: &'static str| {
        rewrite(file, &[key], &move |f| f.set_metadata(key, value))
    };
    let cases: Vec<(Vec<u8>, CheckpointErrorKind, &str)> = vec![
        (
            bias("gate_up_bias", vec![e, i]),
            shape,
            "`gate_up_bias` has shape [4, 32], expected [4, 64] (E, 2I)",
        ),
        (
            bias("gate_up_bias", vec![e * 2 * i]),
            shape,
            "`gate_up_bias`",
        ),
        (
            bias("down_bias", vec![e, 2 * i + 1]),
            shape,
            "`down_bias` has shape [4, 65], expected [4, 64] (E, H)",
        ),
        (bias("down_bias", vec![e + 1, h]), shape, "`down_bias`"),
        (
            meta(&good, "alpha", "0"),
            metadata,
            "`alpha` is 0; the sigmoid's alpha must be positive",
        ),
        (meta(&good, "alpha", "-1.5"), metadata, "`alpha` is -1.5"),
        (
            meta(&good, "alpha", "nan"),
            metadata,
            "`alpha` is `nan`, not a finite number",
        ),
        (
            meta(&good, "alpha", "inf"),
            metadata,
            "`alpha` is `inf`, not a finite number",
        ),
        (
            meta(&good, "limit", "0"),
            metadata,
            "`limit` is 0; the clamp limit must be positive",
        ),
        (
            meta(&good, "activation", "geglu"),
            metadata,
            "`activation` is `geglu`, expected `swiglu` or `gpt_oss`",
        ),
        (
            meta(&good, "activation", "gpt-oss"),
            metadata,
            "`activation` is `gpt-oss`",
        ),
        (
            meta(&good, "clamp_boundary", "exclusive"),
            metadata,
            "`clamp_boundary` is `exclusive`, expected `strict` or `inclusive`",
        ),
        (
            meta(&swiglu, "alpha", "1.702"),
            metadata,
            "`alpha` applies to activation = gpt_oss only",
        ),
        (
            meta(&swiglu, "clamp_boundary", "strict"),
            metadata,
            "`clamp_boundary` applies to activation = gpt_oss only",
        ),
    ];
    for (file, kind, needle) in cases {
        let (got, msg) = file_error_of(&file);
        assert_eq!(got, kind, "{msg}");
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    // The names parse exactly: `activation = swiglu` is the default spelled out.
    let explicit = meta(&swiglu, "activation", "swiglu");
    let (a, _) = execute(&explicit, &cpu()).unwrap();
    let (b, _) = execute(&swiglu, &cpu()).unwrap();
    assert_eq!(
        Checkpoint::parse(&a)
            .unwrap()
            .read_bf16("d_x")
            .unwrap()
            .data,
        Checkpoint::parse(&b)
            .unwrap()
            .read_bf16("d_x")
            .unwrap()
            .data
    );
    // A misspelt bias is not read, and the warning says so.
    let misspelt = rewrite(&good, &["down_bias"], &|f| {
        f.add_bf16_from_f32("down_biases", &[e, h], &values(e * h, 31, 0.5))
            .unwrap()
    });
    let p = Problem::parse(&misspelt, &cpu()).unwrap();
    assert_eq!(
        p.warnings(),
        [Warning::UnreadTensors(vec!["down_biases".into()])]
    );
}

/// The memory estimates count the biases: `E·(2I + H)` bf16 elements on the device, their f64
/// copies on the CPU reference.
#[test]
fn block_memory_estimates_count_the_biases() {
    let (e, h, i, ..) = BLOCK_DIMS;
    let with = Problem::parse(&block_file(None, &BlockSpec::gpt_oss()).file, &cpu()).unwrap();
    let without = BlockSpec {
        biases: false,
        ..BlockSpec::gpt_oss()
    };
    let without = Problem::parse(&block_file(None, &without).file, &cpu()).unwrap();
    let (Call::Block(a), Call::Block(b)) = (&with.call, &without.call) else {
        panic!("block mode expected");
    };
    let elems = (e * (2 * i + h)) as u128;
    for strategy in [RunStrategy::Auto, RunStrategy::Bf16] {
        assert_eq!(
            a.device_bytes(strategy).unwrap() - b.device_bytes(strategy).unwrap(),
            2 * elems
        );
    }
    assert_eq!(
        a.host_bytes(true).unwrap() - b.host_bytes(true).unwrap(),
        16 * elems
    );
    assert_eq!(a.host_bytes(false), b.host_bytes(false));
}

/// Tensors the call does not read come back as a warning (names unescaped, in file order);
/// metadata of the input and the `mxmoe.*` keys are in the output.
#[test]
fn unread_tensors_are_a_warning_and_metadata_is_carried() {
    let case = Case::new(RowOrder::Scattered, RowOrder::Scattered, false);
    let file = case.file(|f| {
        f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
            .unwrap();
        f.add_u8("notes", &[2], &[1, 2]).unwrap();
        f.add_bf16_from_f32("gate", &[case.t, case.top_k], &[0.0; 10])
            .unwrap();
        f.set_metadata("origin", "test");
    });
    let problem = Problem::parse(&file, &cpu()).unwrap();
    assert_eq!(problem.mode(), Mode::Projection);
    let Warning::UnreadTensors(names) = &problem.warnings()[0];
    let mut names = names.clone();
    names.sort();
    assert_eq!(names, ["gate", "notes"]);
    let out = problem.run(Backend::CpuReference).unwrap();
    assert_eq!(out.warnings, problem.warnings());
    let ck_bytes = out.to_bytes().unwrap();
    let ck = Checkpoint::parse(&ck_bytes).unwrap();
    for (key, value) in [
        ("origin", "test"),
        ("scaling", "0.75"),
        (META_MODE, "projection"),
        (META_BACKEND, "cpu-reference"),
        (META_STRATEGY, "reference"),
        (META_DEVICE, "cpu"),
        (META_WEIGHTS, "BF16 [4, 32, 64]"),
        (META_VERSION, env!("CARGO_PKG_VERSION")),
    ] {
        assert_eq!(ck.metadata_value(key), Some(value), "{key}");
    }
    assert_eq!(
        out.tensor("out").unwrap().shape,
        [case.t * case.top_k, case.n]
    );
}

/// The errors are typed: the kind tells a file problem from an argument problem.
#[test]
fn errors_are_typed() {
    let case = Case::new(RowOrder::Scattered, RowOrder::Scattered, false);
    let mut file = case.file(|f| {
        f.add_bf16_from_f32("w", &[case.e, case.n, case.k], &case.w)
            .unwrap()
    });
    let kind = |bytes: &[u8], options: &RunOptions| match Problem::parse(bytes, options) {
        Err(Error::Checkpoint { kind, .. }) => Some(kind),
        Err(Error::InvalidArgument { what, .. }) => panic!("InvalidArgument {what}"),
        other => panic!("{other:?}"),
    };
    let with_meta = |key: &str, value: &str| {
        let ck = Checkpoint::parse(&file).unwrap();
        let mut out = CheckpointWriter::new();
        for name in ck.names() {
            out.add_view(name, &ck.view(name).unwrap()).unwrap();
        }
        for (k, v) in ck.metadata() {
            out.set_metadata(k.clone(), v.clone());
        }
        out.set_metadata(key, value);
        out.to_bytes().unwrap()
    };
    assert_eq!(
        kind(&with_meta("mode", "layer"), &cpu()),
        Some(CheckpointErrorKind::Metadata)
    );
    assert_eq!(
        kind(&with_meta("scaling", "nan"), &cpu()),
        Some(CheckpointErrorKind::Metadata)
    );
    assert!(matches!(
        Problem::parse(
            &file,
            &RunOptions {
                strategy: RunStrategy::Fused,
                ..cpu()
            }
        ),
        Err(Error::InvalidArgument {
            what: "strategy",
            ..
        })
    ));
    file.truncate(file.len() - 3);
    assert_eq!(kind(&file, &cpu()), Some(CheckpointErrorKind::Truncated));
    assert_eq!(
        "selective".parse::<RunStrategy>().unwrap(),
        RunStrategy::Selective
    );
    let msg = "sel".parse::<RunStrategy>().unwrap_err().to_string();
    assert!(msg.contains("\"selective\""), "{msg}");
}

/// MXFP4 weights with scale byte 255 are refused unless allowed, on the CPU reference too.
#[test]
fn nan_scales_need_the_opt_in() {
    let case = Case::new(RowOrder::Scattered, RowOrder::Grouped, false);
    let bits: Vec<u16> = case.w.iter().map(|&v| f32_to_bf16_bits(v)).collect();
    let mx = quantize_mxfp4_bf16(&bits, case.e, case.n, case.k).unwrap();
    let mut file = case.file(|f| f.add_mx("w", &mx, MxLayoutKind::Torchao).unwrap());
    // Expert 1, row 2, block 1 of `w.scales` [4, 32, 2]: patch the stored byte in place.
    let at = {
        let ck = Checkpoint::parse(&file).unwrap();
        let scales = ck.view("w.scales").unwrap();
        scales.data().as_ptr() as usize - file.as_ptr() as usize + (32 + 2) * 2 + 1
    };
    file[at] = 255;
    let msg = Problem::parse(&file, &cpu()).unwrap_err().to_string();
    for needle in ["`w.scales`", "expert 1", "row 2", "block 1", "NaN"] {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    let out = run(
        &file,
        &RunOptions {
            allow_nan_scales: true,
            ..cpu()
        },
        Backend::CpuReference,
    )
    .unwrap();
    assert!(out.tensor("out").unwrap().values.iter().any(|v| v.is_nan()));
}
