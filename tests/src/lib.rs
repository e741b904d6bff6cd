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
        (0..n).map(|_| mxmoe::shared::bf16::round_bf16(scale * self.normal())).collect()
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
        let excess = if d.is_nan() || a.is_nan() != e.is_nan() { f32::INFINITY } else { d - (atol + rtol * e.abs()) };
        if d.is_finite() {
            max_abs = max_abs.max(d);
        }
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    println!("{what}: max abs error {max_abs:.3e} over {} elements", actual.len());
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
    bits.iter().map(|&b| mxmoe::shared::bf16::bf16_bits_to_f32(b)).collect()
}

/// Rounds f32 values to bf16 bits.
pub fn f32_to_bf16(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| mxmoe::shared::bf16::f32_to_bf16_bits(v)).collect()
}
