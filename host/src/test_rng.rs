//! What the tests share: the deterministic PRNG (xorshift64*) and the typed-error assertions.
//! Every module's unit tests use it, and the integration tests compile the same file through a
//! `#[path]` module (`mxmoe_tests::Rng` wraps the generator), so there is one source of each.
//! It names only the crate root's `Error` (`super::Error`, which both crates provide).

use super::Error;

/// A tiny deterministic xorshift64* generator for the tests (no `rand` dependency).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeds the generator (a zero seed is replaced by a fixed non-zero constant).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// Next raw 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)` (n > 0; the modulo bias is irrelevant for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Uniform in `[0, 1)`.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `len` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform() * scale).collect()
    }
}

/// Asserts that `result` failed with [`Error::Shape`] naming `tensor`.
#[track_caller]
pub fn assert_shape_error<T>(result: Result<T, Error>, tensor: &str) {
    match result {
        Ok(_) => panic!("expected a shape error naming {tensor}, got success"),
        Err(e) => assert!(
            matches!(&e, Error::Shape { tensor: t, .. } if *t == tensor),
            "expected a shape error naming {tensor}: {e}"
        ),
    }
}

/// Asserts that `result` failed with [`Error::InvalidArgument`] about `what`.
#[track_caller]
pub fn assert_invalid_argument<T>(result: Result<T, Error>, what: &str) {
    match result {
        Ok(_) => panic!("expected an invalid {what}, got success"),
        Err(e) => assert!(
            matches!(&e, Error::InvalidArgument { what: w, .. } if *w == what),
            "expected an invalid {what}: {e}"
        ),
    }
}
