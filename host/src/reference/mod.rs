//! A deliberately naive CPU reference for the ScatterMoE-LoRA expert linear: the oracle of the GPU
//! parity tests.
//!
//! Everything here is written for obviousness, not speed: plain nested loops over the definitions
//! in SPEC §2 (routing) and §3 (the LoRA-fused expert linear, forward and backward), with every
//! dot product accumulated in `f64`. Two numeric modes are offered ([`Rounding`]):
//!
//! - [`Rounding::Bf16`] rounds to bf16 (through [`crate::shared::bf16::round_bf16`]) exactly at
//!   the points where the kernels convert to the activation dtype, so its results are what an
//!   ideal kernel with an exact accumulator would store. Real kernels accumulate in `f32`, so a
//!   parity test still needs a tolerance of about one bf16 ulp on values whose unrounded sums land
//!   near a rounding boundary.
//! - [`Rounding::Exact`] rounds nowhere and keeps `f64` end to end internally; it is the mode the
//!   finite-difference gradient checks use.
//!
//! Modules: [`routing`] (`flatten_sort_count`, active experts), [`linear`] (the expert linear's
//! forward and backward, with an optional frozen bias) and [`moe`] (the whole gated block:
//! SwiGLU, or gpt-oss's interleaved, biased, clamped α-sigmoid block).

pub mod linear;
pub mod moe;
pub mod routing;

pub use linear::{LinearProblem, RefForward, RefGrads, linear_backward, linear_forward};
pub use routing::{active_experts, flatten_sort_count};
// The production routing vocabulary, re-exported for the tests that build reference problems.
pub use crate::routing::{DROPPED, Routing, RowOrder};

use crate::error::{Error, Result};

/// Where the reference rounds intermediate and final values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Round to bf16 (nearest-even) at the kernels' conversion points (SPEC §3.2, §3.3, §10); every
    /// input is first rounded to bf16 too, as uploading it to the device in the activation dtype
    /// would.
    Bf16,
    /// No rounding at all: inputs are used as given and all arithmetic is `f64`. Only the final
    /// conversion of the public results to `f32` rounds.
    Exact,
}

impl Rounding {
    /// Applies this mode's rounding to one value (bf16 via `f32`, or the identity).
    ///
    /// The `f64 → f32 → bf16` path can double-round in theory; the kernels hold `f32` values at
    /// these points, so going through `f32` is the faithful choice.
    #[inline]
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Rounding::Bf16 => f64::from(crate::shared::bf16::round_bf16(v as f32)),
            Rounding::Exact => v,
        }
    }
}

/// Host memory available for new allocations, in bytes: `MemAvailable` from `/proc/meminfo`
/// (Linux). `None` where that is unknown (another OS, an unreadable file).
pub fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// The `MemAvailable:` line of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

/// Bytes of a tensor of `dims` with `elem_bytes` per element, or `None` on overflow: the sizes
/// that [`check_host_memory`] and `Gpu::check_free_memory` compare.
pub fn tensor_bytes(dims: &[usize], elem_bytes: usize) -> Option<u128> {
    dims.iter()
        .try_fold(elem_bytes as u128, |acc, &d| acc.checked_mul(d as u128))
}

/// The sum of byte counts, `None` if any is `None` or the sum overflows.
pub fn sum_bytes(parts: &[Option<u128>]) -> Option<u128> {
    parts
        .iter()
        .try_fold(0u128, |acc, p| p.and_then(|p| acc.checked_add(p)))
}

/// Checks, before allocating, that `bytes` (computed with checked arithmetic; `None` when the
/// computation overflowed) fit in the host memory available ([`available_host_memory`]).
///
/// Errors: [`Error::SizeOverflow`] for `None`, [`Error::OutOfMemory`] naming `what` and both
/// sizes when `bytes` exceeds `MemAvailable`. Where the available memory is unknown only the
/// overflow is checked.
pub fn check_host_memory(what: impl Into<String>, bytes: Option<u128>) -> Result<()> {
    check_memory_against(what.into(), bytes, available_host_memory())
}

fn check_memory_against(what: String, bytes: Option<u128>, available: Option<u64>) -> Result<()> {
    let Some(needed_bytes) = bytes else {
        return Err(Error::SizeOverflow {
            what,
            detail: "the byte count does not fit in 128 bits".into(),
        });
    };
    match available {
        Some(available_bytes) if needed_bytes > u128::from(available_bytes) => {
            Err(Error::OutOfMemory {
                what,
                needed_bytes,
                available_bytes,
                memory: "host memory (MemAvailable)".into(),
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) use crate::test_rng::XorShift;

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn mem_available_is_parsed_in_bytes() {
        let text = "MemTotal:       16318340 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(12_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
    }

    #[test]
    fn sizes_beyond_the_available_memory_are_typed_errors() {
        let two_tib = 1u128 << 41;
        let e = check_memory_against("out [4194304, 65536]".into(), Some(two_tib), Some(1 << 30))
            .unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { needed_bytes, .. } if needed_bytes == two_tib));
        let msg = e.to_string();
        assert!(
            msg.contains("out [4194304, 65536]") && msg.contains("2.0 TiB"),
            "{msg}"
        );
        assert!(matches!(
            check_memory_against("x".into(), None, Some(1)),
            Err(Error::SizeOverflow { .. })
        ));
        assert!(check_memory_against("x".into(), Some(10), Some(10)).is_ok());
        assert!(check_memory_against("x".into(), Some(two_tib), None).is_ok());
    }
}
