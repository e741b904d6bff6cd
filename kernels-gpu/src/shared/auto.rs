//! `Strategy::Auto`'s rule (A: selective dequantization, B: the fused 4-bit GEMM), as one pure
//! function that the host (`op::plan::auto_strategy`, `auto_strategy_nvfp4`) and the device
//! ([`crate::shared::names::AUTO_GATE`], which decides on the GPU right after routing, so the
//! host starts B's kernels before it knows the answer) both call: they cannot disagree.
//!
//! The measurements behind the thresholds are in `docs/BENCHMARKS.md` ("Choosing A or B").

/// Fewest routed rows per active expert at which the MXFP4 rule picks A (small grids).
pub const AUTO_A_MIN_ROWS: u64 = 256;
/// Routed rows per active expert from which the MXFP4 rule picks A on any grid.
pub const AUTO_A_ROWS_LARGE_GRID: u64 = 2048;
/// Routed rows per active expert from which the NVFP4 rule picks A.
pub const AUTO_NV_A_ROWS: u64 = 256;
// The host takes B without any read-back below `AUTO_A_MIN_ROWS` routed rows, which is the
// NVFP4 rule's own answer only while its threshold is not lower.
const _: () = assert!(AUTO_NV_A_ROWS >= AUTO_A_MIN_ROWS);

/// What the rule knows besides the number of active experts: all of it is on the host before
/// the routing is read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoInputs {
    /// 1: NVFP4 weights' rule; 0: MXFP4's.
    pub nvfp4: bool,
    /// Routed rows `L` (dropped slots included, as the routing counts them).
    pub rows: u64,
    /// The projection's output width `N`.
    pub n: u64,
    /// The device's streaming multiprocessors.
    pub sm_count: u64,
    /// Bytes of A's transient bf16 buffer per active expert (`N·K·2`).
    pub transient_per_expert: u64,
    /// Free device memory in bytes when the call starts.
    pub free_bytes: u64,
}

/// `true`: Strategy A for `active` active experts. MXFP4: A once the active experts average at
/// least [`AUTO_A_ROWS_LARGE_GRID`] routed rows each, or [`AUTO_A_MIN_ROWS`] when the fused
/// GEMM's grid is small (at most four waves of 128×128 output tiles over the SMs: B's decode is
/// then not hidden behind other blocks). NVFP4 (whose fused decode costs an f32 product per
/// value): A from [`AUTO_NV_A_ROWS`] rows per active expert on any grid. Both need A's transient
/// `active·N·K` bf16 buffer to fit in half the free memory. Saturating arithmetic: no input
/// overflows it.
pub const fn auto_picks_a(active: u64, i: &AutoInputs) -> bool {
    let active_or_1 = if active == 0 { 1 } else { active };
    let rows_per_active = i.rows / active_or_1;
    let fits = active.saturating_mul(i.transient_per_expert) <= i.free_bytes / 2;
    if i.nvfp4 {
        return rows_per_active >= AUTO_NV_A_ROWS && fits;
    }
    let row_tiles = rows_per_active.div_ceil(128);
    let fused_blocks =
        i.n.div_ceil(128)
            .saturating_mul(active)
            .saturating_mul(if row_tiles == 0 { 1 } else { row_tiles });
    let small_grid = fused_blocks <= i.sm_count.saturating_mul(4);
    let amortised = rows_per_active >= AUTO_A_ROWS_LARGE_GRID
        || (small_grid && rows_per_active >= AUTO_A_MIN_ROWS);
    amortised && fits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(rows: u64, n: u64) -> AutoInputs {
        AutoInputs {
            nvfp4: false,
            rows,
            n,
            sm_count: 132,
            transient_per_expert: n * 2048 * 2,
            free_bytes: 70 << 30,
        }
    }

    #[test]
    fn thresholds_are_inclusive_and_memory_can_veto() {
        // Sparse: 8 experts × 256 rows, N = 1024 (64 blocks): A, exactly at the threshold.
        assert!(auto_picks_a(8, &mx(2048, 1024)));
        assert!(!auto_picks_a(8, &mx(2047, 1024)));
        // Large grid: only from 2048 rows per expert.
        assert!(!auto_picks_a(256, &mx(256 * 2047, 1024)));
        assert!(auto_picks_a(256, &mx(256 * 2048, 1024)));
        // Not enough memory for the transient buffer.
        let tight = AutoInputs {
            free_bytes: 2 * 8 * 1024 * 2048 * 2 - 2,
            ..mx(2048, 1024)
        };
        assert!(!auto_picks_a(8, &tight));
        let nv = AutoInputs {
            nvfp4: true,
            ..mx(256 * 256, 1024)
        };
        assert!(auto_picks_a(256, &nv));
        assert!(!auto_picks_a(257, &nv));
        // No active expert and saturating sizes never panic.
        assert!(!auto_picks_a(0, &mx(0, 1024)));
        let huge = AutoInputs {
            n: u64::MAX,
            transient_per_expert: u64::MAX,
            ..mx(u64::MAX, 0)
        };
        assert!(!auto_picks_a(u64::MAX, &huge));
    }
}
