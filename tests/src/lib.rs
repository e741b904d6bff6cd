//! Shared harness for the integration and GPU parity tests.
//!
//! GPU tests call [`gpu`] first: on a machine without a CUDA driver or device it prints
//! `skipped: <reason>` and returns `None`, so the test passes vacuously there; with
//! `MXMOE_REQUIRE_GPU=1` (set by the device run script) the skip becomes a failure, so a GPU run
//! can never pass by skipping.

use std::sync::OnceLock;

use mxmoe::device::Gpu;

/// The shared device for this test binary, or `None` (after printing why) when there is none.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    let opened = GPU.get_or_init(|| Gpu::open_default().map_err(|e| e.to_string()));
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

/// A small deterministic PRNG (xorshift64*), so tests draw fresh but reproducible inputs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator (any seed; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
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
    use mxmoe::device::Gpu;
    use mxmoe::mxfp4::MxWeights;
    use mxmoe::op::{
        Bf16Matrix, DenseExperts, DequantBuffer, ExpertLinear, ExpertWeights, Grads, LoraWeights,
        MxExperts, RowOrder, Strategy, backward,
    };
    use mxmoe::reference::{self, LinearProblem, Rounding};
    use mxmoe::routing::DeviceRouting;

    use super::{Rng, assert_close};

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
            }
        }
    }

    /// Host data of a case.
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
    }

    /// Draws the case's data: `W = randn`, `x = randn`, `A, B = 0.01·randn` (SPEC §7), routing =
    /// top-k of random scores (distinct experts per token), gates = renormalised softmax weights.
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
        let w = rng.normal_bf16(c.e * c.n * c.k, 1.0);
        let x = rng.normal_bf16(x_rows * c.k, 1.0);
        let a = rng.normal_bf16(c.e * c.r * c.k, 0.01);
        let b = rng.normal_bf16(c.n * c.e * c.r, 0.01);
        Data {
            ids,
            x,
            x_rows,
            w,
            a,
            b,
            gates: c.gates.then_some(gates),
            s: 0.5,
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
    }

    /// Runs forward and backward on the GPU with dense bf16 weights `d.w`.
    pub fn run_gpu(gpu: &Gpu, c: &Case, d: &Data, dy: &[f32]) -> GpuResult {
        run_gpu_with(gpu, c, d, dy, Base::Dense(&d.w))
    }

    /// Runs forward and backward on the GPU with the given base weights.
    pub fn run_gpu_with(gpu: &Gpu, c: &Case, d: &Data, dy: &[f32], base: Base<'_>) -> GpuResult {
        let routing = DeviceRouting::from_host_ids(gpu, &d.ids, c.t, c.top_k, c.e).unwrap();
        let x = Bf16Matrix::from_f32(gpu, &d.x, d.x_rows, c.k).unwrap();
        let dense;
        let mx;
        let weights = match base {
            Base::Dense(w) => {
                dense = DenseExperts::from_f32(gpu, w, c.e, c.n, c.k).unwrap();
                ExpertWeights::Bf16(&dense)
            }
            Base::Mx(m, _) | Base::MxRecompute(m) => {
                mx = MxExperts::upload(gpu, m).unwrap();
                ExpertWeights::Mxfp4(&mx)
            }
        };
        let lora = (c.r > 0).then(|| LoraWeights {
            a: Bf16Matrix::from_f32(gpu, &d.a, c.e * c.r, c.k).unwrap(),
            b: Bf16Matrix::from_f32(gpu, &d.b, c.n, c.e * c.r).unwrap(),
            rank: c.r,
            scaling: d.s,
        });
        let gates = d
            .gates
            .as_ref()
            .map(|g| Bf16Matrix::from_f32(gpu, g, c.t, c.top_k).unwrap());
        let (strategy, buffer) = match base {
            Base::Mx(_, s) => (s, DequantBuffer::Keep),
            Base::MxRecompute(_) => (Strategy::SelectiveDequant, DequantBuffer::Recompute),
            Base::Dense(_) => (Strategy::Fused, DequantBuffer::Keep),
        };
        let layer = ExpertLinear {
            dequant_buffer: buffer,
            ..ExpertLinear::new(weights, lora.as_ref(), c.input, c.output).with_strategy(strategy)
        };
        let (fwd, saved) = layer.forward(gpu, &x, &routing, gates.as_ref()).unwrap();
        let dy_m = Bf16Matrix::from_f32(gpu, dy, fwd.out.rows(), fwd.out.cols()).unwrap();
        let Grads {
            dx,
            da,
            db,
            d_gates,
        } = backward(gpu, &saved, &dy_m).unwrap();
        GpuResult {
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
            lora_a: &d.a,
            lora_b: &d.b,
            rank: c.r,
            scaling: d.s,
            fan_out: match c.input {
                RowOrder::Scattered => c.top_k,
                RowOrder::Grouped => 1,
            },
            input_order: c.input,
            output_order: c.output,
            gates: d.gates.as_deref(),
        }
    }

    /// Output rows of the forward (and of dy): `[T, N]` with gates, else `[T·k, N]`.
    pub fn out_rows(c: &Case) -> usize {
        if c.gates { c.t } else { c.t * c.top_k }
    }

    /// Compares a GPU result with the reference (bf16 rounding points), printing max errors.
    /// Tolerance: `rtol` relative plus `atol_frac·max|ref|` absolute per tensor.
    pub fn compare(
        c: &Case,
        d: &Data,
        w_ref: &[f32],
        dy: &[f32],
        got: &GpuResult,
        rtol: f32,
        atol_frac: f32,
    ) {
        let routing = reference::flatten_sort_count(&d.ids, c.t, c.top_k, c.e).unwrap();
        let mut p = problem(c, d, w_ref);
        if c.input == RowOrder::Grouped {
            // Grouped input on the GPU has T·k rows with the dropped rows last; the reference
            // takes only the valid rows.
            p.x_rows = routing.sorted_expert_idxs.len();
            p.x = &d.x[..p.x_rows * c.k];
        }
        let fwd = reference::linear_forward(&p, &routing, Rounding::Bf16).unwrap();
        // The reference's grouped outputs have only the valid rows; the GPU's have T·k rows with
        // dropped rows last (zero).
        let l_valid = routing.sorted_expert_idxs.len();
        let expect_out: Vec<f32> = match (&fwd.y, c.output) {
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
        let grads = reference::linear_backward(&p, &routing, &dy_ref, Rounding::Bf16).unwrap();
        let tol = |v: &[f32]| atol_frac * v.iter().fold(0f32, |m, x| m.max(x.abs())) + 1e-6;
        let tag = format!("{c:?}");
        assert_close(
            &format!("out {tag}"),
            &got.out,
            &expect_out,
            tol(&expect_out),
            rtol,
        );
        let mut expect_dx = grads.dx.clone();
        if c.input == RowOrder::Grouped {
            expect_dx.resize(c.t * c.top_k * c.k, 0.0);
        }
        assert_close(
            &format!("dx {tag}"),
            &got.dx,
            &expect_dx,
            tol(&expect_dx),
            rtol,
        );
        if c.r > 0 {
            assert_close(
                &format!("dA {tag}"),
                got.da.as_ref().unwrap(),
                &grads.da,
                tol(&grads.da),
                rtol,
            );
            assert_close(
                &format!("dB {tag}"),
                got.db.as_ref().unwrap(),
                &grads.db,
                tol(&grads.db),
                rtol,
            );
        } else {
            assert!(got.da.is_none() && got.db.is_none());
        }
        match (&got.d_gates, &grads.d_gates) {
            (Some(g), Some(e)) => {
                assert_close(&format!("d_gates {tag}"), g, e, tol(e), rtol);
            }
            (None, None) => {}
            _ => panic!("d_gates presence differs"),
        }
    }
}
