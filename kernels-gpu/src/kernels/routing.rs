//! Routing on the GPU (SPEC §2.1): top-k expert ids `[T, k]` → grouped order, stable (ties by
//! flat slot index), with dropped slots (id −1) sorted last into bucket `E`. Three launches:
//! count (per-chunk histograms), scan (bucket bases, expert offsets), scatter (stable ranks by
//! `match.any`). Contract: `shared::params::RouteParams`; chunks of `ROUTE_CHUNK` slots.

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::smem::{SharedAddr, dynamic_smem, ld_shared_u32, st_shared_u32};
use crate::ptx::sreg::{ctaid_x, laneid, ntid_x, tid_x};
use crate::ptx::warp::{
    atom_shared_add_u32, bar_warp_sync, lanemask_lt, match_any_sync_b32, shfl_sync_bfly_b32,
};
use crate::shared::auto::auto_picks_a;
use crate::shared::params::{AutoGateParams, ROUTE_CHUNK, RouteParams};
use crate::tile::gmem::{load, store};

/// The bucket of slot `i`: its expert, or `E` for −1 and (flagged) invalid ids.
///
/// # Safety
/// `i < slots`.
#[inline(always)]
unsafe fn bucket(p: &RouteParams, i: u32) -> u32 {
    // SAFETY: `i < slots`, the length of `ids`.
    let id: i64 = unsafe {
        if p.ids_i64 != 0 {
            load::<i64>(p.ids_addr + 8 * i as u64)
        } else {
            load::<i32>(p.ids_addr + 4 * i as u64) as i64
        }
    };
    if id >= 0 && id < p.num_experts as i64 {
        id as u32
    } else {
        if id != -1 {
            // SAFETY: the error word is valid; concurrent writers store the same value.
            unsafe { store::<u32>(p.error_addr, 1) };
        }
        p.num_experts
    }
}

/// Step 1: `counts[c][b]` = slots of chunk `c` in bucket `b`.
///
/// # Safety
/// Launch contract: `ceil(slots / ROUTE_CHUNK)` blocks of any multiple of 32 threads,
/// `4·(E+1)` bytes of dynamic shared memory; buffers sized as `RouteParams` documents.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_route_count(p: RouteParams) {
    let hist = dynamic_smem();
    let buckets = p.num_experts + 1;
    let (tid, nt) = (tid_x(), ntid_x());
    let mut b = tid;
    while b < buckets {
        // SAFETY: `b ≤ E`, inside the `(E+1)`-word histogram.
        unsafe { st_shared_u32(hist.offset(4 * b), 0) };
        b += nt;
    }
    // SAFETY: all threads.
    unsafe { bar_sync_0() };
    let chunk = ctaid_x();
    let begin = chunk * ROUTE_CHUNK;
    let mut i = begin + tid;
    while i < begin + ROUTE_CHUNK && i < p.slots {
        // SAFETY: `i < slots`; the bucket is ≤ E.
        unsafe { atom_shared_add_u32(hist.offset(4 * bucket(&p, i)), 1) };
        i += nt;
    }
    // SAFETY: all threads.
    unsafe { bar_sync_0() };
    let row = p.counts_addr + 4 * chunk as u64 * buckets as u64;
    let mut b = tid;
    while b < buckets {
        // SAFETY: `counts` holds chunks·(E+1) words.
        unsafe { store(row + 4 * b as u64, ld_shared_u32(hist.offset(4 * b))) };
        b += nt;
    }
}

/// Step 2 (one block): turns `counts` into absolute per-chunk bucket bases and writes the
/// inclusive `expert_offsets` (bucket `E`, the dropped slots, comes last and has no offset).
///
/// # Safety
/// Launch contract: 1 block of 1024 threads, `4·1024` bytes of dynamic shared memory.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_route_scan(p: RouteParams) {
    let sums: SharedAddr = dynamic_smem();
    let tid = tid_x();
    let nt = ntid_x();
    let buckets = p.num_experts + 1;
    let chunks = p.slots.div_ceil(ROUTE_CHUNK);
    // Each thread owns a contiguous run of buckets.
    let per = buckets.div_ceil(nt);
    let b0 = if tid * per < buckets {
        tid * per
    } else {
        buckets
    };
    let b1 = if b0 + per < buckets {
        b0 + per
    } else {
        buckets
    };
    let cell = |c: u32, b: u32| p.counts_addr + 4 * (c as u64 * buckets as u64 + b as u64);
    // Pass 1: slots in the owned buckets.
    let mut local = 0u32;
    let mut b = b0;
    while b < b1 {
        let mut c = 0;
        while c < chunks {
            // SAFETY: inside `counts`.
            local += unsafe { load::<u32>(cell(c, b)) };
            c += 1;
        }
        b += 1;
    }
    // Block-wide inclusive scan of the per-thread totals (Hillis–Steele in shared memory).
    // SAFETY: `tid < 1024` words.
    unsafe { st_shared_u32(sums.offset(4 * tid), local) };
    let mut d = 1;
    while d < nt {
        // SAFETY: all threads, uniform loop.
        unsafe { bar_sync_0() };
        // SAFETY: indices < nt.
        let add = if tid >= d {
            unsafe { ld_shared_u32(sums.offset(4 * (tid - d))) }
        } else {
            0
        };
        // SAFETY: all threads.
        unsafe { bar_sync_0() };
        // SAFETY: own slot.
        unsafe {
            st_shared_u32(
                sums.offset(4 * tid),
                ld_shared_u32(sums.offset(4 * tid)) + add,
            )
        };
        d *= 2;
    }
    // SAFETY: own slot, written by this thread last.
    let mut start = unsafe { ld_shared_u32(sums.offset(4 * tid)) } - local;
    // Pass 2: absolute chunk bases and the experts' inclusive ends.
    let mut b = b0;
    while b < b1 {
        let mut run = 0u32;
        let mut c = 0;
        while c < chunks {
            // SAFETY: inside `counts`.
            unsafe {
                let n: u32 = load(cell(c, b));
                store(cell(c, b), start + run);
                run += n;
            }
            c += 1;
        }
        if b < p.num_experts {
            // SAFETY: `b < E`, inside `offsets`.
            unsafe { store(p.offsets_addr + 4 * b as u64, start + run) };
        }
        start += run;
        b += 1;
    }
}

/// Step 3: one warp per chunk scatters its slots to `base[chunk][bucket] + rank`, where the rank
/// counts earlier slots of the chunk in the same bucket (stable).
///
/// # Safety
/// Launch contract: `ceil(slots / ROUTE_CHUNK)` blocks of 32 threads, `4·(E+1)` bytes of dynamic
/// shared memory; `counts` holds the bases written by step 2.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_route_scatter(p: RouteParams) {
    let next = dynamic_smem();
    let buckets = p.num_experts + 1;
    let lane = laneid();
    let chunk = ctaid_x();
    let row = p.counts_addr + 4 * chunk as u64 * buckets as u64;
    let mut b = lane;
    while b < buckets {
        // SAFETY: inside `counts` and the `(E+1)`-word table.
        unsafe { st_shared_u32(next.offset(4 * b), load::<u32>(row + 4 * b as u64)) };
        b += 32;
    }
    // SAFETY: whole warp.
    unsafe { bar_warp_sync() };
    let begin = chunk * ROUTE_CHUNK;
    let mut base = begin;
    while base < begin + ROUTE_CHUNK && base < p.slots {
        let i = base + lane;
        let valid = i < p.slots;
        // SAFETY: `i < slots` when read.
        let bk = if valid {
            unsafe { bucket(&p, i) }
        } else {
            u32::MAX
        };
        // SAFETY: whole warp converged (the loop bound is warp-uniform).
        let peers = unsafe { match_any_sync_b32(bk) };
        let rank = (peers & lanemask_lt()).count_ones();
        let pos = if valid {
            // SAFETY: bucket ≤ E.
            (unsafe { ld_shared_u32(next.offset(4 * bk)) }) + rank
        } else {
            0
        };
        // SAFETY: whole warp; every lane has read its base before the leaders update it.
        unsafe { bar_warp_sync() };
        if valid {
            // SAFETY: `pos < slots` (bases partition 0..slots); outputs hold `slots` words.
            unsafe {
                store(p.sorted_expert_addr + 4 * pos as u64, bk);
                store(p.ssi_addr + 4 * pos as u64, i);
            }
            if rank == 0 {
                // SAFETY: the lowest lane of each peer group advances its bucket's base.
                unsafe {
                    st_shared_u32(
                        next.offset(4 * bk),
                        ld_shared_u32(next.offset(4 * bk)) + peers.count_ones(),
                    )
                };
            }
        }
        // SAFETY: whole warp.
        unsafe { bar_warp_sync() };
        base += 32;
    }
}

/// `Strategy::Auto` decided on the device; see `shared::params::AutoGateParams`. Lane `l`
/// looks at experts `l, l + 32, …`; the active count is summed across the warp, so every lane
/// applies the rule to the same number.
///
/// # Safety
/// Launch contract: one block of 32 threads; `offsets` and `gated` hold `experts` u32 and
/// `report` `1 + experts`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_auto_gate(p: AutoGateParams) {
    let lane = laneid();
    let mut active = 0u32;
    let mut e = lane;
    while e < p.experts {
        // SAFETY: `e < experts`, the length of `offsets`; so is `e - 1` when `e > 0`.
        let (start, end) = unsafe {
            let end: u32 = load(p.offsets_addr + 4 * e as u64);
            let start: u32 = if e == 0 {
                0
            } else {
                load(p.offsets_addr + 4 * (e as u64 - 1))
            };
            (start, end)
        };
        if end > start {
            active += 1;
        }
        e += 32;
    }
    let mut mask = 16;
    while mask > 0 {
        // SAFETY: all 32 lanes reach this loop (the one above ends for each after
        // `ceil((experts - lane) / 32)` rounds) with the same `mask` sequence.
        active += unsafe { shfl_sync_bfly_b32(active, mask) };
        mask >>= 1;
    }
    let a = auto_picks_a(active as u64, &p.inputs());
    if lane == 0 {
        // SAFETY: `report` holds at least one word.
        unsafe { store::<u32>(p.report_addr, a as u32) };
    }
    let mut e = lane;
    while e < p.experts {
        // SAFETY: `e < experts`: inside `offsets` and `gated`, and `1 + e` inside `report`.
        unsafe {
            let end: u32 = load(p.offsets_addr + 4 * e as u64);
            store::<u32>(p.report_addr + 4 * (1 + e as u64), end);
            store::<u32>(p.gated_addr + 4 * e as u64, if a { 0 } else { end });
        }
        e += 32;
    }
}
