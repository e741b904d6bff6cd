//! Shared harness for the integration and GPU parity tests.
//!
//! GPU tests call [`gpu`] first: on a machine without a CUDA driver or device it prints
//! `skipped: <reason>` and returns `None`, so the test passes vacuously there; with
//! `MXMOE_REQUIRE_GPU=1` (set by the device run script) the skip becomes a failure, so a GPU run
//! can never pass by skipping.

use std::sync::OnceLock;

use mxmoe::device::Gpu;
use mxmoe::tune::{TuneMode, Tuner, forced_from_env};
use mxmoe::{Error, Runtime};

/// The shared device for this test binary, or `None` (after printing why) when there is none.
///
/// Only a machine without a CUDA driver or without a device skips ([`Error::NoDriver`],
/// [`Error::NoDevice`]); any other failure to open the device (the PTX module does not load, the
/// architecture is wrong, memory is short) panics, so a GPU run can never pass by skipping. With
/// `MXMOE_REQUIRE_GPU=1` (set by the device run script) a skip is a failure too.
///
/// The device gets the tests' tuner ([`test_runtime`]).
pub fn gpu() -> Option<&'static Runtime> {
    static GPU: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let opened = GPU.get_or_init(|| match Gpu::open_default() {
        Ok(g) => Ok(test_runtime(g)),
        Err(e @ (Error::NoDriver | Error::NoDevice { .. })) => Err(e.to_string()),
        Err(e) => panic!("the GPU is present but could not be opened: {e}"),
    });
    match opened {
        Ok(g) => Some(g),
        Err(reason) => {
            if std::env::var("MXMOE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("MXMOE_REQUIRE_GPU=1 but no GPU is usable: {reason}");
            }
            println!("skipped: {reason}");
            None
        }
    }
}

/// `gpu` with the tests' tuner: in memory, in `Default` mode, so tests never read or write the
/// user's tuning cache and never time candidates; `MXMOE_GEMM_CONFIG=<index>` (read once per
/// call) forces one tile configuration for every GEMM of the binary, and a forced configuration
/// the device cannot run is an error of every call; an invalid value panics. Output buffers are
/// poisoned ([`Gpu::set_poison_outputs`]), so an element a kernel leaves unwritten reads as NaN.
pub fn test_runtime(gpu: Gpu) -> Runtime {
    gpu.set_poison_outputs(true);
    let name = gpu.limits().name.clone();
    Runtime::new(
        gpu,
        Tuner::new(&name, TuneMode::Default, None)
            .with_forced(forced_from_env().unwrap_or_else(|e| panic!("{e}"))),
    )
}

/// The host crate's test generator, compiled here from the same source.
#[path = "../../host/src/test_rng.rs"]
#[allow(dead_code)] // the host's unit tests use every method, this crate a few.
mod test_rng;

use test_rng::XorShift;
pub use test_rng::{assert_invalid_argument, assert_shape_error};

/// A small deterministic PRNG (the host tests' xorshift64*, seeded through a multiplicative
/// hash), so tests draw fresh but reproducible inputs.
#[derive(Clone, Debug)]
pub struct Rng(XorShift);

impl Rng {
    /// Seeds the generator (any seed; the state is never zero).
    pub fn new(seed: u64) -> Self {
        Self(XorShift::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.0.unit_f32()
    }

    /// Approximately standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }

    /// `n` values `scale · N(0,1)` rounded to bf16 (returned as f32).
    pub fn normal_bf16(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| mxmoe::shared::bf16::round_bf16(scale * self.normal()))
            .collect()
    }
}

/// Asserts `actual ≈ expected` element-wise with `|a − e| ≤ atol + rtol·|e|`, NaN never passing;
/// a failure names the worst element. Returns the maximum absolute error.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(actual.len(), expected.len(), "{what}: length mismatch");
    let mut worst: Option<(usize, f32)> = None;
    let mut max_abs = 0f32;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let d = (a - e).abs();
        let excess = if d.is_nan() || a.is_nan() != e.is_nan() {
            f32::INFINITY
        } else {
            d - (atol + rtol * e.abs())
        };
        if d.is_finite() {
            max_abs = max_abs.max(d);
        }
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    println!(
        "{what}: max abs error {max_abs:.3e} over {} elements",
        actual.len()
    );
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: actual {} expected {} (|diff| {:.3e}, tolerance atol {atol:e} + rtol {rtol:e}·|expected|)",
            actual[i],
            expected[i],
            (actual[i] - expected[i]).abs()
        );
    }
    max_abs
}

/// Widens bf16 bits to f32.
pub fn bf16_to_f32(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| mxmoe::shared::bf16::bf16_bits_to_f32(b))
        .collect()
}

/// Rounds f32 values to bf16 bits.
pub fn f32_to_bf16(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| mxmoe::shared::bf16::f32_to_bf16_bits(v))
        .collect()
}

/// One randomly drawn expert-linear problem (SPEC §7 data recipe), with its CPU reference.
pub mod linear_case {
    use mxmoe::Runtime;
    use mxmoe::mxfp4::MxWeights;
    use mxmoe::nvfp4::NvWeights;
    use mxmoe::op::{
        Bf16Matrix, DenseExperts, DequantBuffer, ExpertLinear, ExpertWeights, Grads, LoraWeights,
        MxExperts, NvExperts, RowOrder, Strategy, backward,
    };
    use mxmoe::reference::{self, LinearProblem, Rounding};
    use mxmoe::routing::DeviceRouting;

    use super::Rng;

    /// Shape and flags of a case.
    #[derive(Clone, Copy, Debug)]
    pub struct Case {
        /// Experts.
        pub e: usize,
        /// Reduction dim K.
        pub k: usize,
        /// Output dim N.
        pub n: usize,
        /// Tokens.
        pub t: usize,
        /// Top-k.
        pub top_k: usize,
        /// LoRA rank (0: none).
        pub r: usize,
        /// Seed.
        pub seed: u64,
        /// Input order (`Scattered`: `[T, K]` token order).
        pub input: RowOrder,
        /// Output order.
        pub output: RowOrder,
        /// Down-projection gates.
        pub gates: bool,
        /// Fraction (per mille) of slots dropped (id −1).
        pub dropped_permille: u64,
        /// Route only to the first `active` experts (0: all).
        pub active: usize,
        /// A frozen per-expert bias `[E, N]` (`randn`) in the forward.
        pub bias: bool,
    }

    impl Case {
        /// A case with the common defaults (scattered in, grouped out, no gates).
        pub fn new(
            e: usize,
            k: usize,
            n: usize,
            t: usize,
            top_k: usize,
            r: usize,
            seed: u64,
        ) -> Self {
            Case {
                e,
                k,
                n,
                t,
                top_k,
                r,
                seed,
                input: RowOrder::Scattered,
                output: RowOrder::Grouped,
                gates: false,
                dropped_permille: 0,
                active: 0,
                bias: false,
            }
        }
    }

    /// SPEC §7's small shape (E 8, K 128, N 256, T 16, top-2, rank 8) with token-ordered input
    /// and grouped output (seed 0).
    pub fn spec_small() -> Case {
        Case::new(8, 128, 256, 16, 2, 8, 0)
    }

    /// SPEC §7's small shape with grouped input, gates and scattered output (seed 7).
    pub fn spec_small_gated() -> Case {
        Case {
            input: RowOrder::Grouped,
            output: RowOrder::Scattered,
            gates: true,
            ..Case::new(8, 128, 256, 16, 2, 8, 7)
        }
    }

    /// SPEC §7's representative shape (E 32, K 2048, N 1024, T 64, top-4, rank 16; seed 1).
    pub fn spec_representative() -> Case {
        Case::new(32, 2048, 1024, 64, 4, 16, 1)
    }

    /// Ragged token counts and ranks on one small shape (E 6, K 96, N 64): a case per
    /// `(tokens, top_k, rank)`, seeds from `seed` up.
    pub fn ragged_tokens(seed: u64, cases: &[(usize, usize, usize)]) -> Vec<Case> {
        (0..)
            .zip(cases)
            .map(|(i, &(t, top_k, r))| Case::new(6, 96, 64, t, top_k, r, seed + i))
            .collect()
    }

    /// The LoRA rank sweep of the parity suites: every rank class the kernels distinguish (a rank
    /// of 1, odd ranks whose right factor is gathered element by element, ranks that are a
    /// multiple of 8 and of the padded width, each padded width — 16 and 32 have their own
    /// `wgmma` epilogue — the largest), each with token-ordered input and grouped output, and
    /// with grouped input, gates and scattered output. Seeds from `seed`.
    pub fn rank_sweep(seed: u64) -> Vec<Case> {
        [1usize, 7, 8, 16, 32, 64, 128]
            .iter()
            .enumerate()
            .flat_map(|(i, &r)| {
                let seed = seed + 2 * i as u64;
                [
                    Case::new(8, 256, 192, 96, 2, r, seed),
                    Case {
                        input: RowOrder::Grouped,
                        output: RowOrder::Scattered,
                        gates: true,
                        ..Case::new(6, 128, 136, 40, 3, r, seed + 1)
                    },
                ]
            })
            .collect()
    }

    /// Host data of a case.
    #[derive(Clone, Debug)]
    pub struct Data {
        /// Expert ids `[T, k]`.
        pub ids: Vec<i64>,
        /// `x`.
        pub x: Vec<f32>,
        /// Rows of `x`.
        pub x_rows: usize,
        /// `W_store [E, N, K]`.
        pub w: Vec<f32>,
        /// `A [E·r, K]`.
        pub a: Vec<f32>,
        /// `B [N, E·r]`.
        pub b: Vec<f32>,
        /// Gates `[T, k]`.
        pub gates: Option<Vec<f32>>,
        /// Scaling.
        pub s: f32,
        /// The bias `[E, N]` (cases with `bias`).
        pub bias: Option<Vec<f32>>,
    }

    /// The case's LoRA factors on the device: `A [E·r, K]`, `B [N, E·r]`, scaling `s`.
    pub fn upload_lora(gpu: &Runtime, c: &Case, d: &Data) -> LoraWeights {
        LoraWeights {
            a: Bf16Matrix::from_f32(gpu, &d.a, c.e * c.r, c.k).unwrap(),
            b: Bf16Matrix::from_f32(gpu, &d.b, c.n, c.e * c.r).unwrap(),
            rank: c.r,
            scaling: d.s,
        }
    }

    /// Draws the case's data so that every term of the result is visible to the tolerance: `x =
    /// randn`, `W = randn/√K`, `A = randn/√K`, `B = randn/√r` and a scaling `s` in [1.25, 1.75),
    /// so the base term `x·Wᵀ` and the LoRA term `s·(x·Aᵀ)·Bᵀ` are both of order one (forward,
    /// and likewise in dX); routing = top-k of random scores (distinct experts per token), gates
    /// = renormalised random weights. (SPEC §7's `A, B = 0.01·randn` makes the LoRA term about
    /// 1e-4 of the base term, below any bf16 tolerance.)
    pub fn draw(c: &Case) -> Data {
        let mut rng = Rng::new(c.seed);
        let pool = if c.active == 0 { c.e } else { c.active };
        assert!(c.top_k <= pool);
        let mut ids = Vec::with_capacity(c.t * c.top_k);
        let mut gates = Vec::with_capacity(c.t * c.top_k);
        for _ in 0..c.t {
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < c.top_k {
                let e = rng.below(pool as u64) as usize;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            let w: Vec<f32> = (0..c.top_k).map(|_| rng.uniform() + 0.1).collect();
            let sum: f32 = w.iter().sum();
            for (j, &e) in chosen.iter().enumerate() {
                let drop = c.dropped_permille > 0 && rng.below(1000) < c.dropped_permille;
                ids.push(if drop { -1 } else { e as i64 });
                gates.push(mxmoe::shared::bf16::round_bf16(w[j] / sum));
            }
        }
        let x_rows = match c.input {
            RowOrder::Scattered => c.t,
            RowOrder::Grouped => c.t * c.top_k,
        };
        let inv_sqrt = |n: usize| 1.0 / (n.max(1) as f32).sqrt();
        let w = rng.normal_bf16(c.e * c.n * c.k, inv_sqrt(c.k));
        let x = rng.normal_bf16(x_rows * c.k, 1.0);
        let a = rng.normal_bf16(c.e * c.r * c.k, inv_sqrt(c.k));
        let b = rng.normal_bf16(c.n * c.e * c.r, inv_sqrt(c.r));
        let s = 1.25 + 0.5 * rng.uniform();
        // Drawn last, so a case without a bias draws exactly what it drew before biases existed.
        let bias = c.bias.then(|| rng.normal_bf16(c.e * c.n, 1.0));
        Data {
            ids,
            x,
            x_rows,
            w,
            a,
            b,
            gates: c.gates.then_some(gates),
            s,
            bias,
        }
    }

    impl Data {
        /// The same data with `f` applied to every value (ids unchanged): `f32::abs` gives the
        /// inputs of the magnitude reference.
        pub fn map(&self, f: impl Fn(f32) -> f32) -> Data {
            let m = |v: &[f32]| v.iter().map(|&x| f(x)).collect::<Vec<f32>>();
            Data {
                ids: self.ids.clone(),
                x: m(&self.x),
                x_rows: self.x_rows,
                w: m(&self.w),
                a: m(&self.a),
                b: m(&self.b),
                gates: self.gates.as_deref().map(m),
                s: f(self.s),
                bias: self.bias.as_deref().map(m),
            }
        }
    }

    /// GPU outputs of a case.
    pub struct GpuResult {
        /// Forward output.
        pub out: Vec<f32>,
        /// Gradients.
        pub dx: Vec<f32>,
        /// dA.
        pub da: Option<Vec<f32>>,
        /// dB.
        pub db: Option<Vec<f32>>,
        /// d_gates.
        pub d_gates: Option<Vec<f32>>,
        /// The tile configurations the forward and the dX GEMM ran with (rows of
        /// `GEMM_CONFIGS`).
        pub configs: [usize; 2],
        /// The path the forward took (`Forward::strategy`).
        pub strategy: Strategy,
    }

    /// Which base weights a GPU run uses.
    #[derive(Clone, Copy)]
    pub enum Base<'a> {
        /// Dense bf16 weights from these f32 values (`[E, N, K]`).
        Dense(&'a [f32]),
        /// MXFP4 weights with a strategy (B: decoded inside the kernels; A: selective dequant).
        Mx(&'a MxWeights, Strategy),
        /// MXFP4 weights with Strategy A recomputing its buffer in backward.
        MxRecompute(&'a MxWeights),
        /// NVFP4 weights with a strategy and buffer policy.
        Nv(&'a NvWeights, Strategy, DequantBuffer),
    }

    /// Runs forward and backward on the GPU with dense bf16 weights `d.w`.
    pub fn run_gpu(gpu: &Runtime, c: &Case, d: &Data, dy: &[f32]) -> GpuResult {
        run_gpu_with(gpu, c, d, dy, Base::Dense(&d.w))
    }

    /// Runs forward and backward on the GPU with the given base weights.
    pub fn run_gpu_with(
        gpu: &Runtime,
        c: &Case,
        d: &Data,
        dy: &[f32],
        base: Base<'_>,
    ) -> GpuResult {
        let routing = DeviceRouting::from_host_ids(gpu, &d.ids, c.t, c.top_k, c.e).unwrap();
        let x = Bf16Matrix::from_f32(gpu, &d.x, d.x_rows, c.k).unwrap();
        let dense;
        let mx;
        let nv;
        let weights = match base {
            Base::Dense(w) => {
                dense = DenseExperts::from_f32(gpu, w, c.e, c.n, c.k).unwrap();
                ExpertWeights::Bf16(&dense)
            }
            Base::Mx(m, _) | Base::MxRecompute(m) => {
                mx = MxExperts::upload(gpu, m).unwrap();
                ExpertWeights::Mxfp4(&mx)
            }
            Base::Nv(w, _, _) => {
                nv = NvExperts::upload(gpu, w).unwrap();
                ExpertWeights::Nvfp4(&nv)
            }
        };
        let lora = (c.r > 0).then(|| upload_lora(gpu, c, d));
        let gates = d
            .gates
            .as_ref()
            .map(|g| Bf16Matrix::from_f32(gpu, g, c.t, c.top_k).unwrap());
        let (strategy, buffer) = match base {
            Base::Mx(_, s) => (s, DequantBuffer::Keep),
            Base::MxRecompute(_) => (Strategy::SelectiveDequant, DequantBuffer::Recompute),
            Base::Dense(_) => (Strategy::Fused, DequantBuffer::Keep),
            Base::Nv(_, s, b) => (s, b),
        };
        let bias = d
            .bias
            .as_ref()
            .map(|b| Bf16Matrix::from_f32(gpu, b, c.e, c.n).unwrap());
        let layer = ExpertLinear {
            dequant_buffer: buffer,
            ..ExpertLinear::new(weights, lora.as_ref(), c.input, c.output)
                .with_strategy(strategy)
                .with_bias(bias.as_ref())
        };
        let (fwd, saved) = layer.forward(gpu, &x, &routing, gates.as_ref()).unwrap();
        let dy_m = Bf16Matrix::from_f32(gpu, dy, fwd.out.rows(), fwd.out.cols()).unwrap();
        let Grads {
            dx,
            da,
            db,
            d_gates,
            gemm_config,
        } = backward(gpu, &saved, &dy_m).unwrap();
        if let Some(forced) = gpu.tuner().forced() {
            assert_eq!(
                [fwd.gemm_config, gemm_config],
                [forced, forced],
                "the forced tile configuration did not run"
            );
        }
        GpuResult {
            configs: [fwd.gemm_config, gemm_config],
            strategy: fwd.strategy,
            out: fwd.out.to_f32(gpu).unwrap(),
            dx: dx.to_f32(gpu).unwrap(),
            da: da.map(|m| m.to_f32(gpu).unwrap()),
            db: db.map(|m| m.to_f32(gpu).unwrap()),
            d_gates: d_gates.map(|m| m.to_f32(gpu).unwrap()),
        }
    }

    /// The reference problem of a case, with the given (possibly dequantized) weights.
    pub fn problem<'a>(c: &Case, d: &'a Data, w: &'a [f32]) -> LinearProblem<'a> {
        LinearProblem {
            x: &d.x,
            x_rows: d.x_rows,
            w,
            num_experts: c.e,
            n: c.n,
            k: c.k,
            // A rank-0 run of a case drawn with factors (the run without LoRA) passes none.
            lora_a: if c.r > 0 { &d.a } else { &[] },
            lora_b: if c.r > 0 { &d.b } else { &[] },
            rank: c.r,
            scaling: d.s,
            fan_out: match c.input {
                RowOrder::Scattered => c.top_k,
                RowOrder::Grouped => 1,
            },
            input_order: c.input,
            output_order: c.output,
            gates: d.gates.as_deref(),
            bias: d.bias.as_deref(),
        }
    }

    /// Output rows of the forward (and of dy): `[T, N]` with gates, else `[T·k, N]`.
    pub fn out_rows(c: &Case) -> usize {
        if c.gates { c.t } else { c.t * c.top_k }
    }

    /// The reference's results for one set of inputs, laid out like the GPU's.
    pub struct RefRun {
        /// Forward output as the GPU returns it (`y` with gates; grouped output padded with zero
        /// rows for dropped slots).
        pub out: Vec<f32>,
        /// Per-slot output before the gate combination (`[T·k, N]`, scattered), with gates.
        pub slots: Option<Vec<f32>>,
        /// dX in the GPU's layout (grouped input padded with zero rows).
        pub dx: Vec<f32>,
        /// dA.
        pub da: Vec<f32>,
        /// dB.
        pub db: Vec<f32>,
        /// d_gates.
        pub d_gates: Option<Vec<f32>>,
    }

    /// Runs the CPU reference on `d` with base weights `w`, shaping results like the GPU's.
    pub fn reference_run(c: &Case, d: &Data, w: &[f32], dy: &[f32], rounding: Rounding) -> RefRun {
        let routing = reference::flatten_sort_count(&d.ids, c.t, c.top_k, c.e).unwrap();
        let mut p = problem(c, d, w);
        if c.input == RowOrder::Grouped {
            // Grouped input on the GPU has T·k rows with the dropped rows last; the reference
            // takes only the valid rows.
            p.x_rows = routing.sorted_expert_idxs.len();
            p.x = &d.x[..p.x_rows * c.k];
        }
        let fwd = reference::linear_forward(&p, &routing, rounding).unwrap();
        // The reference's grouped outputs have only the valid rows; the GPU's have T·k rows with
        // dropped rows last (zero).
        let l_valid = routing.sorted_expert_idxs.len();
        let out: Vec<f32> = match (&fwd.y, c.output) {
            (Some(y), _) => y.clone(),
            (None, RowOrder::Scattered) => fwd.out.clone(),
            (None, RowOrder::Grouped) => {
                let mut v = fwd.out.clone();
                v.resize(c.t * c.top_k * c.n, 0.0);
                v
            }
        };
        // dy for the reference: grouped output gradient covers only valid rows.
        let dy_ref: Vec<f32> = if !c.gates && c.output == RowOrder::Grouped {
            dy[..l_valid * c.n].to_vec()
        } else {
            dy.to_vec()
        };
        let grads = reference::linear_backward(&p, &routing, &dy_ref, rounding).unwrap();
        let mut dx = grads.dx;
        if c.input == RowOrder::Grouped {
            dx.resize(c.t * c.top_k * c.k, 0.0);
        }
        RefRun {
            slots: fwd.y.is_some().then_some(fwd.out),
            out,
            dx,
            da: grads.da,
            db: grads.db,
            d_gates: grads.d_gates,
        }
    }

    /// Per-slot dX of a token-ordered input (`[T·k, K]`, slot rows, dropped slots zero): the
    /// terms the kernels round before the slot sum.
    fn reference_slot_dx(c: &Case, d: &Data, w: &[f32], dy: &[f32]) -> Vec<f32> {
        let slot_case = Case {
            input: RowOrder::Scattered,
            ..*c
        };
        let x: Vec<f32> = (0..c.t * c.top_k)
            .flat_map(|slot| d.x[slot / c.top_k * c.k..][..c.k].iter().copied())
            .collect();
        let slot_data = Data {
            x,
            x_rows: c.t * c.top_k,
            ..d.clone()
        };
        let routing = reference::flatten_sort_count(&d.ids, c.t, c.top_k, c.e).unwrap();
        let mut p = problem(&slot_case, &slot_data, w);
        p.fan_out = 1;
        let l_valid = routing.sorted_expert_idxs.len();
        let dy_ref: Vec<f32> = if !c.gates && c.output == RowOrder::Grouped {
            dy[..l_valid * c.n].to_vec()
        } else {
            dy.to_vec()
        };
        reference::linear_backward(&p, &routing, &dy_ref, Rounding::Exact)
            .unwrap()
            .dx
    }

    /// One bf16 rounding step: a result rounded once can differ from the reference's by one
    /// unit in the last place, `2^-7` of its magnitude, when the two f32/f64 sums straddle a
    /// rounding boundary.
    pub const ULP: f32 = 1.0 / 128.0;
    /// Relative error of an f32 sum per term (`2^-24` unit roundoff, with a factor 16 of
    /// headroom for the order of the partial sums and the f32 products).
    pub const ACC: f32 = 16.0 / 16_777_216.0;

    /// Asserts `got ≈ expect` element by element against `tol[i]` (NaN never passes) and, when
    /// the tensor is large enough for a statistic, `‖got − expect‖₂ ≤ l2·‖expect‖₂`: rounding
    /// differences are rare single-ulp flips, so their norm is a small fraction of one ulp,
    /// while a systematic error (a wrong scale, a dropped term) moves every element.
    pub fn assert_within(what: &str, got: &[f32], expect: &[f32], tol: &[f32]) {
        assert_eq!(got.len(), expect.len(), "{what}: length mismatch");
        assert_eq!(tol.len(), expect.len(), "{what}: tolerance length mismatch");
        let mut worst: Option<(usize, f32)> = None;
        let (mut err2, mut ref2, mut max_abs) = (0f64, 0f64, 0f32);
        for (i, ((&a, &e), &t)) in got.iter().zip(expect).zip(tol).enumerate() {
            let diff = (a - e).abs();
            let excess = if diff.is_nan() || a.is_nan() != e.is_nan() {
                f32::INFINITY
            } else {
                diff / t.max(f32::MIN_POSITIVE)
            };
            if diff.is_finite() {
                max_abs = max_abs.max(diff);
                err2 += f64::from(diff) * f64::from(diff);
                ref2 += f64::from(e) * f64::from(e);
            }
            if excess > 1.0 && worst.is_none_or(|(_, w)| excess > w) {
                worst = Some((i, excess));
            }
        }
        let rel_l2 = (err2 / ref2.max(f64::MIN_POSITIVE)).sqrt() as f32;
        println!(
            "{what}: max abs error {max_abs:.3e}, relative L2 {rel_l2:.3e} over {} elements",
            got.len()
        );
        if let Some((i, ratio)) = worst {
            panic!(
                "{what}: element {i}: actual {} expected {} (|diff| {:.3e} is {ratio:.2}× its bf16 bound {:.3e})",
                got[i],
                expect[i],
                (got[i] - expect[i]).abs(),
                tol[i]
            );
        }
        let l2_bound = ULP * (2.0 / (got.len().max(1) as f32).sqrt()).max(0.15);
        assert!(
            ref2 == 0.0 || rel_l2 <= l2_bound,
            "{what}: relative L2 error {rel_l2:.3e} over {} elements exceeds {l2_bound:.3e} (systematic error)",
            got.len()
        );
    }

    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.abs()).collect()
    }

    /// Compares a GPU result with the CPU reference (bf16 rounding points) element by element,
    /// each against its own bf16 bound:
    /// `ULP·|ref| + ACC·n_red·mag + ULP·mag_rounded`, where `mag` is the reference run on the
    /// absolute values of every input (the sum of the magnitudes of all terms), `n_red` the
    /// length of the reduction, and `mag_rounded` the magnitude of the terms that pass through
    /// another bf16 rounding first (the LoRA intermediates XA and YB, the per-slot outputs the
    /// gates combine, the per-slot dX rows of a token-ordered input, the per-slot outputs of
    /// `d_gates`): each of those can flip by one ulp. Plus the relative L2 check of
    /// [`assert_within`]. Returns the bounds used for `out` and `dx`.
    pub fn compare(
        c: &Case,
        d: &Data,
        w_ref: &[f32],
        dy: &[f32],
        got: &GpuResult,
    ) -> [Vec<f32>; 2] {
        let r = reference_run(c, d, w_ref, dy, Rounding::Bf16);
        let abs_d = d.map(f32::abs);
        let (abs_w, abs_dy) = (abs(w_ref), abs(dy));
        let mag = reference_run(c, &abs_d, &abs_w, &abs_dy, Rounding::Exact);
        let zero_w = vec![0.0; w_ref.len()];
        let mag_lora =
            (c.r > 0).then(|| reference_run(c, &abs_d, &zero_w, &abs_dy, Rounding::Exact));
        let tag = format!("{c:?}");
        let bound = |reference: &[f32], mag: &[f32], n_red: usize, rounded: &[f32]| -> Vec<f32> {
            (0..reference.len())
                .map(|i| {
                    let rounded = rounded.get(i).copied().unwrap_or(0.0);
                    ULP * reference[i].abs() + ACC * n_red as f32 * mag[i] + ULP * rounded + 1e-30
                })
                .collect()
        };
        let sum2 =
            |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| x + y).collect() };
        // out: flips of XA (LoRA) and, with gates, of each gated per-slot output.
        let mut out_rounded = mag_lora.as_ref().map(|m| m.out.clone()).unwrap_or_default();
        if let (Some(slots), Some(g)) = (&r.slots, &d.gates) {
            let per_token: Vec<f32> = (0..c.t * c.n)
                .map(|i| {
                    let (t, n) = (i / c.n, i % c.n);
                    (0..c.top_k)
                        .map(|j| {
                            g[t * c.top_k + j].abs() * slots[(t * c.top_k + j) * c.n + n].abs()
                        })
                        .sum()
                })
                .collect();
            out_rounded = if out_rounded.is_empty() {
                per_token
            } else {
                sum2(&out_rounded, &per_token)
            };
        }
        let out_bound = bound(&r.out, &mag.out, c.k + c.r, &out_rounded);
        assert_within(&format!("out {tag}"), &got.out, &r.out, &out_bound);
        // dx: flips of YB (LoRA) and, with a token-ordered input, of each per-slot dX row.
        let mut dx_rounded = mag_lora.as_ref().map(|m| m.dx.clone()).unwrap_or_default();
        if c.input == RowOrder::Scattered && c.top_k > 1 {
            let slot_dx = reference_slot_dx(c, d, w_ref, dy);
            let per_token: Vec<f32> = (0..c.t * c.k)
                .map(|i| {
                    let (t, kk) = (i / c.k, i % c.k);
                    (0..c.top_k)
                        .map(|j| slot_dx[(t * c.top_k + j) * c.k + kk].abs())
                        .sum()
                })
                .collect();
            dx_rounded = if dx_rounded.is_empty() {
                per_token
            } else {
                sum2(&dx_rounded, &per_token)
            };
        }
        let dx_bound = bound(&r.dx, &mag.dx, c.n + c.r, &dx_rounded);
        assert_within(&format!("dx {tag}"), &got.dx, &r.dx, &dx_bound);
        if c.r > 0 {
            // Every term of dA (dB) passes through the rounded YB (XA).
            let rows = c.t * c.top_k;
            assert_within(
                &format!("dA {tag}"),
                got.da.as_ref().unwrap(),
                &r.da,
                &bound(&r.da, &mag.da, rows, &mag.da),
            );
            assert_within(
                &format!("dB {tag}"),
                got.db.as_ref().unwrap(),
                &r.db,
                &bound(&r.db, &mag.db, rows, &mag.db),
            );
        } else {
            assert!(got.da.is_none() && got.db.is_none());
        }
        match (&got.d_gates, &r.d_gates) {
            (Some(g), Some(e)) => {
                // d_gates[t, j] = ⟨out_slot, dy_t⟩ over the rounded per-slot output.
                let slots = r.slots.as_ref().expect("gated reference keeps the slots");
                let rounded: Vec<f32> = (0..c.t * c.top_k)
                    .map(|slot| {
                        let t = slot / c.top_k;
                        (0..c.n)
                            .map(|n| (slots[slot * c.n + n] * dy[t * c.n + n]).abs())
                            .sum()
                    })
                    .collect();
                assert_within(
                    &format!("d_gates {tag}"),
                    g,
                    e,
                    &bound(e, &rounded, c.n, &rounded),
                );
            }
            (None, None) => {}
            _ => panic!("d_gates presence differs"),
        }
        [out_bound, dx_bound]
    }

    /// The direct check of the LoRA term: `out − out(no LoRA)` and `dx − dx(no LoRA)` from the
    /// GPU against the reference's LoRA term alone (the reference with zero base weights).
    /// Per element each difference may carry the error of both GPU results (`bounds`, the
    /// [`compare`] bounds of the run with LoRA, which cover the run without too) plus the
    /// rounding of the reference's term; and the least-squares slope of the GPU's term on the
    /// reference's must be 1 within 0.5 % — a LoRA scaling off by 1 % fails it.
    pub fn compare_lora_term(
        c: &Case,
        d: &Data,
        dy: &[f32],
        got: &GpuResult,
        got_without: &GpuResult,
        bounds: &[Vec<f32>; 2],
    ) {
        assert!(c.r > 0, "the LoRA-term check needs a rank");
        let zero_w = vec![0.0; c.e * c.n * c.k];
        // The term alone: zero base weights and no bias (which both runs share, so it cancels in
        // their difference).
        let without_bias = Data {
            bias: None,
            ..d.clone()
        };
        let lora = reference_run(c, &without_bias, &zero_w, dy, Rounding::Bf16);
        let tag = format!("{c:?}");
        for (what, with, without, term, bound) in [
            ("out", &got.out, &got_without.out, &lora.out, &bounds[0]),
            ("dx", &got.dx, &got_without.dx, &lora.dx, &bounds[1]),
        ] {
            let diff: Vec<f32> = with.iter().zip(without).map(|(a, b)| a - b).collect();
            let tol: Vec<f32> = (0..diff.len())
                .map(|i| 2.0 * bound[i] + ULP * term[i].abs() + 1e-30)
                .collect();
            let name = format!("LoRA term of {what} {tag}");
            let (mut num, mut den) = (0f64, 0f64);
            for (&g, &e) in diff.iter().zip(term) {
                num += f64::from(g) * f64::from(e);
                den += f64::from(e) * f64::from(e);
            }
            if den > 0.0 {
                // The fitted slope's standard error comes from the residuals around the fit (a
                // wrong scaling moves the slope, not the residuals); allow 0.5 % plus four
                // standard errors, so a scaling error of 2 % fails wherever the term has a few
                // hundred elements.
                let slope = num / den;
                let residual2: f64 = diff
                    .iter()
                    .zip(term)
                    .map(|(&g, &e)| (f64::from(g) - slope * f64::from(e)).powi(2))
                    .sum();
                let dof = (diff.len().max(2) - 1) as f64;
                let std_err = (residual2 / dof / den).sqrt();
                let allowed = 5e-3 + 4.0 * std_err;
                println!(
                    "{name}: least-squares slope {slope:.5} (allowed 1 ± {allowed:.2e}) over {} elements",
                    diff.len()
                );
                assert!(
                    (slope - 1.0).abs() <= allowed,
                    "{name}: the GPU's LoRA term is {slope:.5}× the reference's (allowed 1 ± {allowed:.2e})"
                );
            }
            // Elementwise bound only; the rounding of two nearly equal results is not a
            // statistic the L2 check of `assert_within` is calibrated for.
            for (i, ((&g, &e), &t)) in diff.iter().zip(term).zip(&tol).enumerate() {
                assert!(
                    (g - e).abs() <= t,
                    "{name}: element {i}: GPU term {g} reference {e} (|diff| {:.3e} > bound {t:.3e})",
                    (g - e).abs()
                );
            }
        }
    }

    /// Runs the case on the GPU with and without its LoRA factors and checks everything against
    /// the reference: [`compare`] on the full result and, with a rank, [`compare_lora_term`].
    /// Returns the full GPU result.
    pub fn check_case(
        gpu: &Runtime,
        c: &Case,
        d: &Data,
        w_ref: &[f32],
        dy: &[f32],
        base: Base<'_>,
    ) -> GpuResult {
        let got = run_gpu_with(gpu, c, d, dy, base);
        let bounds = compare(c, d, w_ref, dy, &got);
        if c.r > 0 {
            let without = run_gpu_with(gpu, &Case { r: 0, ..*c }, d, dy, base);
            compare_lora_term(c, d, dy, &got, &without, &bounds);
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    /// The GPU suites' inputs depend on this exact sequence (the values of the generator before
    /// it shared the host's source), so a change to the generator fails here, not on a GPU.
    #[test]
    fn rng_sequence_is_pinned() {
        let mut rng = Rng::new(42);
        let drawn = [rng.next_u64(), rng.next_u64(), rng.next_u64()];
        assert_eq!(
            drawn,
            [
                0x7c3d_3da7_30e9_fd2b,
                0xbc66_74d0_9f2b_33fc,
                0xc1cd_cc7e_2428_8d6f
            ]
        );
    }
}
