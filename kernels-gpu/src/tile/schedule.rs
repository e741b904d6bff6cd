//! The expert-aligned tile schedule: every M tile of a grouped GEMM belongs to exactly one
//! bucket (expert, or the dropped-row bucket `E`), so no tile runs a masked loop for another
//! expert. Tile `t` is found from the inclusive expert offsets with one warp-wide scan; every
//! warp computes it redundantly, so no shared memory or barrier is needed.

use crate::ptx::sreg::laneid;
use crate::ptx::warp::{shfl_sync_idx_b32, shfl_sync_up_b32, vote_sync_ballot_b32};
use crate::tile::gmem::load;

/// Rows `[begin, end)` of bucket `bucket` handled by one tile.
#[derive(Clone, Copy)]
pub struct Tile {
    /// Expert index, or `num_experts` for dropped rows.
    pub bucket: u32,
    /// First grouped row.
    pub begin: u32,
    /// One past the last grouped row (`end − begin ≤ bm`).
    pub end: u32,
}

/// Finds tile `t` when each bucket's rows are cut into tiles of `bm` rows, or `None` when `t` is
/// past the last tile.
///
/// # Safety
/// Whole warp, converged, with the same `t`; `offsets_addr` holds `num_experts` u32 inclusive
/// row ends, non-decreasing and `≤ rows`.
#[inline(always)]
pub unsafe fn find_tile(
    offsets_addr: u64,
    num_experts: u32,
    rows: u32,
    bm: u32,
    t: u32,
) -> Option<Tile> {
    let lane = laneid();
    let mut before = 0u32; // tiles in earlier groups of 32 buckets
    let mut base = 0u32;
    while base <= num_experts {
        let b = base + lane;
        // SAFETY: indices are < num_experts whenever they are read.
        let (start, end) = unsafe {
            if b < num_experts {
                let s = if b == 0 {
                    0
                } else {
                    load::<u32>(offsets_addr + 4 * (b as u64 - 1))
                };
                (s, load::<u32>(offsets_addr + 4 * b as u64))
            } else if b == num_experts {
                let s = if b == 0 {
                    0
                } else {
                    load::<u32>(offsets_addr + 4 * (b as u64 - 1))
                };
                (s, rows)
            } else {
                (0, 0)
            }
        };
        let tiles = (end - start).div_ceil(bm);
        // Inclusive warp scan of tile counts.
        let mut incl = tiles;
        let mut d = 1;
        while d < 32 {
            // SAFETY: whole warp converged (loop bounds are warp-uniform).
            let up = unsafe { shfl_sync_up_b32(incl, d) };
            if lane >= d {
                incl += up;
            }
            d *= 2;
        }
        // SAFETY: as above.
        let total = unsafe { shfl_sync_idx_b32(incl, 31) };
        if t < before + total {
            // SAFETY: warp-uniform branch (all lanes agree on `total`).
            let hit = unsafe { vote_sync_ballot_b32(t < before + incl) };
            let l = hit.trailing_zeros();
            // SAFETY: as above.
            let (excl_l, start_l, end_l) = unsafe {
                (
                    shfl_sync_idx_b32(incl - tiles, l),
                    shfl_sync_idx_b32(start, l),
                    shfl_sync_idx_b32(end, l),
                )
            };
            let j = t - before - excl_l;
            let begin = start_l + j * bm;
            let stop = begin + bm;
            return Some(Tile {
                bucket: base + l,
                begin,
                end: if stop < end_l { stop } else { end_l },
            });
        }
        before += total;
        base += 32;
    }
    None
}
