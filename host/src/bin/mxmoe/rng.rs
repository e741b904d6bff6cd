//! Deterministic random data for the CLI's problems: a SplitMix64 generator, Box–Muller normals,
//! and a chunked parallel filler whose output depends only on the seed, never on the number of
//! threads.
//!
//! The numbers are *not* PyTorch's `torch.randn` stream (that cannot be reproduced without its
//! Philox/MT implementation); they have the same distribution, and a seed means the same data on
//! every machine and every run.

/// Elements per independently seeded chunk of [`normal_bf16_bits`]. Fixing the chunk size (not
/// the thread count) keeps the output identical on every machine.
const CHUNK_ELEMS: usize = 1 << 20;

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator with good statistical quality, also
/// used to derive independent seeds for sub-streams.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    /// The second Box–Muller value, handed out on the next [`Rng::normal`] call.
    spare: Option<f32>,
}

/// One SplitMix64 output step applied to `z` (the finaliser alone, used for seed mixing).
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: mix64(seed ^ 0x6A09_E667_F3BC_C909),
            spare: None,
        }
    }

    /// A generator for sub-stream `stream` of `seed` (independent of every other sub-stream).
    pub fn substream(seed: u64, stream: u64) -> Self {
        Self::new(
            mix64(seed.wrapping_add(0x9E37_79B9_7F4A_7C15))
                ^ mix64(stream.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0xA5A5),
        )
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `(0, 1]` (never zero, so its logarithm is finite).
    fn uniform_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal sample (Box–Muller; both values of each pair are used).
    pub fn normal(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let radius = (-2.0 * self.uniform_open0().ln()).sqrt();
        let angle = std::f64::consts::TAU * self.uniform_open0();
        self.spare = Some((radius * angle.sin()) as f32);
        (radius * angle.cos()) as f32
    }
}

/// `len` samples of `scale · N(0, 1)` as bf16 bits, generated in parallel.
///
/// Chunk `c` (elements `c·2^20 …`) is drawn from [`Rng::substream`]`(seed, stream·2^32 + c)`, so
/// the result is a pure function of `(len, scale, seed, stream)`. Large inputs (the benchmark's
/// expert weights have 2^29 elements) would take seconds on one core.
pub fn normal_bf16_bits(len: usize, scale: f32, seed: u64, stream: u32) -> Vec<u16> {
    let mut out = vec![0u16; len];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<(usize, &mut [u16])> = out.chunks_mut(CHUNK_ELEMS).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads.max(1)).max(1);
    let fill = |work: Vec<(usize, &mut [u16])>| {
        for (c, chunk) in work {
            let mut rng = Rng::substream(seed, (u64::from(stream) << 32) | c as u64);
            for v in chunk.iter_mut() {
                *v = mxmoe::shared::bf16::f32_to_bf16_bits(scale * rng.normal());
            }
        }
    };
    if chunks.len() <= 1 || threads <= 1 {
        fill(chunks);
        return out;
    }
    std::thread::scope(|scope| {
        let mut chunks = chunks;
        while !chunks.is_empty() {
            let rest = chunks.split_off(per_thread.min(chunks.len()));
            let work = std::mem::replace(&mut chunks, rest);
            scope.spawn(|| fill(work));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = Rng::new(5);
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| f64::from(rng.normal())).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn parallel_fill_is_deterministic_and_chunked() {
        let a = normal_bf16_bits(3 * CHUNK_ELEMS + 17, 0.5, 9, 1);
        let b = normal_bf16_bits(3 * CHUNK_ELEMS + 17, 0.5, 9, 1);
        assert_eq!(a, b);
        // A prefix is the same data: chunks do not depend on the total length.
        let c = normal_bf16_bits(CHUNK_ELEMS + 3, 0.5, 9, 1);
        assert_eq!(&a[..CHUNK_ELEMS + 3], &c[..]);
        // Another stream differs.
        assert_ne!(normal_bf16_bits(64, 0.5, 9, 2), a[..64]);
    }
}
