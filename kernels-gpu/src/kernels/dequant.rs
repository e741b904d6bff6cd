//! MXFP4 and NVFP4 → bf16 dequantization of selected experts (Strategy A's building block, SPEC
//! §4.1; NVFP4: issue #17).

use crate::ptx::cvt::{mul_rn_bf16x2, prmt_b32};
use crate::shared::mxfp4::{E8M0_NAN, place_byte_scaled_down, scale_fold};
use crate::shared::nvfp4::{NV_CHUNKS_PER_LANE, NV_WARP_CHUNKS, NvChunks};
use crate::shared::params::DequantParams;
use crate::tile::gemm::{decode_byte_nv, nv_block_fold};
use crate::tile::gmem::{grid_stride, load, store_16};

/// Which experts a dequant kernel decodes: `experts[0..num_selected]` (u32, each checked
/// against `num_experts`), each `items_per_expert` 8-value chunks.
#[derive(Clone, Copy)]
struct Selection {
    experts_addr: u64,
    num_selected: u32,
    num_experts: u32,
    items_per_expert: u64,
}

impl Selection {
    /// The selection of `p`, whose experts have `items_per_expert` work items each.
    #[inline(always)]
    fn of(p: &DequantParams, items_per_expert: u64) -> Self {
        Self {
            experts_addr: p.experts_addr,
            num_selected: p.num_selected,
            num_experts: p.num_experts,
            items_per_expert,
        }
    }

    /// Work items of all selected experts: `num_selected · items_per_expert`.
    #[inline(always)]
    fn total(&self) -> u64 {
        self.num_selected as u64 * self.items_per_expert
    }

    /// The expert of selection slot `s`.
    ///
    /// # Safety
    /// `s < num_selected`, and `experts_addr` holds `num_selected` u32.
    #[inline(always)]
    unsafe fn expert(&self, s: u64) -> u32 {
        // SAFETY: `s < num_selected`, the length of `experts` (caller).
        unsafe { load(self.experts_addr + 4 * s) }
    }
}

/// Values of one MXFP4 chunk, the kernel's unit: 4 packed bytes (one 32-bit load), a quarter of
/// a scale block, 16 output bytes (one 16-byte store).
const MX_CHUNK: u64 = 8;
/// Chunks per lane per grid-stride step of the MXFP4 kernel (its loads are all issued before
/// the first decode: 16 packed bytes and 4 scale bytes in flight per thread).
const MX_CHUNKS_PER_LANE: u64 = 4;
/// Chunks per warp and grid-stride step: lane `l` of the warp owns chunks `32·j + l`, so each
/// of a warp's loads covers 128 contiguous packed bytes and each store 512 contiguous output
/// bytes.
const MX_WARP_CHUNKS: u64 = 32 * MX_CHUNKS_PER_LANE;

/// Decodes one chunk: the 4 packed bytes of `word` (even k in each byte's low nibble) scaled by
/// the E8M0 byte `scale`, as 4 bf16x2 words. The codes are placed into bf16 bit fields
/// (`e2m1 · 2^-126`, [`place_byte_scaled_down`] of a `prmt`-extracted byte) and multiplied by
/// the folded scale ([`scale_fold`]: one product by `2^(b − 1)` for `b ≤ 128`, by 2^126 and then
/// `2^(b − 127)` above) — the decode of the fused K-loop. Every product is exact, or ±Inf
/// exactly where the f32 product `e2m1 · 2^(b − 127)` overflows (bytes 253 and 254), and byte 0
/// keeps its subnormal results, so the words equal `dequant_bf16_bits` bit for bit
/// (`shared::mxfp4`'s exhaustive test of the fold); a NaN scale (255) gives the canonical
/// `0x7FC0` for all 8 values, substituted here (the product's NaN bits are the hardware's).
#[inline(always)]
fn decode_chunk(word: u32, scale: u8) -> [u32; 4] {
    let fold = scale_fold(scale);
    let d = |j: u32| {
        let v = mul_rn_bf16x2(
            place_byte_scaled_down(prmt_b32(word, 0x4440 | j)),
            fold.first,
        );
        if fold.two_step {
            mul_rn_bf16x2(v, fold.second)
        } else {
            v
        }
    };
    // A select, not a branch: the decode runs either way, so the compiler has no branch to sink
    // the chunk's code load into (all of a lane's loads stay ahead of its first decode).
    let nan = scale == E8M0_NAN;
    [d(0), d(1), d(2), d(3)].map(|v| if nan { 0x7FC0_7FC0 } else { v })
}

/// The code word and scale byte of chunk `src + 32·j` of `packed` (chunk `i` covers values
/// `8·i .. 8·i + 8` of `[E, n, k]`, inside scale block `i / 4` since `k % 32 == 0`). Written as
/// offsets `128·j` and `8·j` from chunk `src`'s addresses, so a lane's loads differ by
/// immediate offsets only.
///
/// # Safety
/// `src + 32·j < E·n·k/8`: its 4 bytes at `4·(src + 32·j)` lie in `packed` (4-aligned: the
/// buffer is 16-aligned) and its block's scale byte at `(src + 32·j) / 4 = src / 4 + 8·j` in
/// `scales` (`E·n·k/32` bytes).
#[inline(always)]
unsafe fn fetch_chunk(p: &DequantParams, src: u64, j: u64) -> (u32, u8) {
    // SAFETY: in bounds and aligned (caller).
    unsafe {
        (
            load::<u32>(p.packed_addr + 4 * src + 128 * j),
            load::<u8>(p.scales_addr + src / 4 + 8 * j),
        )
    }
}

/// Decodes output chunk `c + 32·j` from its code word and scale byte and stores its 16 bytes.
///
/// # Safety
/// `c + 32·j < num_selected·n·k/8`: the 16 bytes at `16·(c + 32·j)` lie in `out`
/// (`num_selected·n·k` bf16), 16-byte aligned.
#[inline(always)]
unsafe fn store_chunk(p: &DequantParams, c: u64, j: u64, word: u32, scale: u8) {
    // SAFETY: in bounds and aligned (caller).
    unsafe { store_16(p.out_addr + 16 * c + 512 * j, decode_chunk(word, scale)) };
}

/// `out[s, n, k] = e2m1(code) · 2^(scale − 127)` as bf16 for every selected expert `experts[s]`,
/// output row `n` and `k`.
///
/// The output of the selected experts is cut into 8-value chunks (4 packed bytes, a quarter of
/// a scale block, 16 output bytes); chunk `c` of selection slot `s` is chunk `c mod cpe` of
/// expert `experts[c / cpe]` (`cpe = n·k/8`) and its output lies at `16·c`. Per grid-stride step
/// each warp takes [`MX_WARP_CHUNKS`] consecutive chunks, lane `l` the chunks `32·j + l`
/// (`j < MX_CHUNKS_PER_LANE`): it issues all its 32-bit code loads and scale-byte loads, then
/// decodes and stores each chunk with one 16-byte store, so every load and store instruction of
/// a warp covers contiguous bytes (128 of codes, 512 of output). When a lane's chunks lie in one
/// expert (all but the few lanes whose chunks straddle an expert's end) their addresses are
/// constant offsets of the first; otherwise each chunk is located on its own. The slot of a
/// lane's first chunk is carried from step to step by one addition (no division per step); all
/// offsets are 64-bit.
///
/// Numerics: bit-identical to torchao's `dequantize(bf16)` and to the CPU dequantizer, with a NaN
/// scale byte (255) giving `0x7FC0` for all 32 elements of its block ([`decode_chunk`]).
///
/// # Safety
/// Launch contract: 1-D grid and block, the block a multiple of 32 threads, no shared memory;
/// `packed` holds `E·n·k/2` bytes and `scales` `E·n·k/32` bytes with `E = num_experts`;
/// `experts` holds `num_selected` u32; `out` holds `num_selected·n·k` bf16; `k % 32 == 0`; all
/// buffers 16-byte aligned. Entries of `experts` that are `≥ num_experts` are skipped (the host
/// rejects them before launch).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_dequant_mxfp4_bf16(p: DequantParams) {
    let cpe = p.n * (p.k / MX_CHUNK);
    if cpe == 0 {
        return;
    }
    let sel = Selection::of(&p, cpe);
    let total = sel.total();
    // Lane `lane` of global warp `g / 32` (blocks are whole warps: launch contract); the warps
    // of the grid advance together by `step` chunks.
    let (g, threads) = grid_stride();
    let lane = g % 32;
    let step = threads / 32 * MX_WARP_CHUNKS;
    let (step_slots, step_within) = (step / cpe, step % cpe);
    // This lane's first chunk `c = s·cpe + within`, `within < cpe`.
    let c = g / 32 * MX_WARP_CHUNKS + lane;
    let (mut s, mut within) = (c / cpe, c % cpe);

    // Invariant: the lane's first chunk is `c = s·cpe + within` with `within < cpe`, so
    // `c < total` exactly when `s < num_selected`.
    while s < p.num_selected as u64 {
        let c = s * cpe + within;
        if within + (MX_WARP_CHUNKS - 32) < cpe {
            // All of this lane's chunks `c + 32·j` lie in slot `s` (the last one's index in it
            // is `< cpe`), so they are `< total`.
            // SAFETY: `s < num_selected` (invariant).
            let e = unsafe { sel.expert(s) };
            if e < sel.num_experts {
                // Chunk `src + 32·j` of `packed` is chunk `within + 32·j < cpe` of expert `e <
                // E`; its scale byte is at `src / 4 + 8·j` (32·j is a multiple of 4).
                let src = e as u64 * cpe + within;
                // All loads first, then the decodes and stores (a store may alias a later load
                // as far as the compiler knows, so it would not hoist them itself).
                let fetched: [(u32, u8); MX_CHUNKS_PER_LANE as usize] =
                    // SAFETY: `src + 32·j < E·n·k/8` (above).
                    core::array::from_fn(|j| unsafe { fetch_chunk(&p, src, j as u64) });
                for (j, &(word, scale)) in fetched.iter().enumerate() {
                    // SAFETY: `c + 32·j < total` (above).
                    unsafe { store_chunk(&p, c, j as u64, word, scale) };
                }
            }
        } else {
            // The lane's chunks cross the end of slot `s` (or of the output): each on its own.
            for j in 0..MX_CHUNKS_PER_LANE {
                let cj = c + 32 * j;
                if cj < total {
                    // SAFETY: `cj / cpe < num_selected` since `cj < total`.
                    let e = unsafe { sel.expert(cj / cpe) };
                    if e < sel.num_experts {
                        // SAFETY: `cj % cpe < cpe` and `e < E`, so the chunk's index in `packed`
                        // is `< E·n·k/8`; `cj < total`.
                        unsafe {
                            let (word, scale) = fetch_chunk(&p, e as u64 * cpe + cj % cpe, 0);
                            store_chunk(&p, cj, 0, word, scale);
                        }
                    }
                }
            }
        }
        s += step_slots;
        within += step_within;
        if within >= cpe {
            within -= cpe;
            s += 1;
        }
    }
}

/// Decodes one NVFP4 chunk: the 4 packed bytes of `word` (8 codes, even k in each byte's low
/// nibble) of a block with E4M3 byte `scale` and tensor scale `ts` (1.0 without), as 4 bf16x2
/// words — the decode of the fused K-loop: the block factor `ts · e4m3(scale)` folded once
/// ([`nv_block_fold`]), each byte's codes placed, widened, multiplied in f32 and rounded once by
/// `cvt.rn` ([`decode_byte_nv`]). Bit for bit `bf16(e2m1(code) · (ts · e4m3(scale)))`, the
/// host's dequantizer (`shared::nvfp4`'s exhaustive test of the fold).
#[inline(always)]
fn decode_chunk_nv(word: u32, scale: u8, ts: f32) -> [u32; 4] {
    let fold = nv_block_fold(scale as u32, ts);
    [0, 1, 2, 3].map(|j| decode_byte_nv(word, j, fold))
}

/// The code word and E4M3 byte of chunk `src + 32·j` of `packed` (chunk `i` covers values
/// `8·i .. 8·i + 8` of `[E, n, k]`, inside block `i / 2` since `k % 16 == 0`). Written as
/// offsets `128·j` and `16·j` from chunk `src`'s addresses, so a lane's loads differ by
/// immediate offsets only.
///
/// # Safety
/// `src + 32·j < E·n·k/8`: its 4 bytes at `4·(src + 32·j)` lie in `packed` (4-aligned: the
/// buffer is 16-aligned) and its block's byte at `(src + 32·j) / 2 = src / 2 + 16·j` in
/// `scales` (`E·n·k/16` bytes).
#[inline(always)]
unsafe fn fetch_chunk_nv(p: &DequantParams, src: u64, j: u64) -> (u32, u8) {
    // SAFETY: in bounds and aligned (caller).
    unsafe {
        (
            load::<u32>(p.packed_addr + 4 * src + 128 * j),
            load::<u8>(p.scales_addr + src / 2 + 16 * j),
        )
    }
}

/// The tensor scale at index `idx` of `tensor_scales [E, groups]`, or 1.0 without tensor scales
/// (`tensor_scales_addr == 0`).
///
/// # Safety
/// `idx < E·groups` when `tensor_scales_addr != 0`.
#[inline(always)]
unsafe fn tensor_scale(p: &DequantParams, idx: u64) -> f32 {
    if p.tensor_scales_addr != 0 {
        // SAFETY: `idx < E·groups`, the buffer's length (caller, launch contract).
        unsafe { load::<f32>(p.tensor_scales_addr + 4 * idx) }
    } else {
        1.0
    }
}

/// `out[s, n, k] = bf16(e2m1(code) · (tensor_scale · e4m3(scale)))` for every selected expert
/// `experts[s]`, row `n` and `k` (see [`DequantParams`]).
///
/// The MXFP4 kernel's walk, with tensor-scale groups: the output of the selected experts is cut
/// into 8-value chunks (4 packed bytes, half a 16-value block so one E4M3 byte, 16 output
/// bytes), chunk `c` at `16·c`; each slot's chunks form `groups` groups of `per_group` chunks
/// (`n/groups` rows each; one group without tensor scales), and chunk `c` lies at
/// [`NvChunkPos`](crate::shared::nvfp4::NvChunkPos) `(slot, group, within)` ([`NvChunks`]). Per grid-stride step each warp takes
/// [`NV_WARP_CHUNKS`] consecutive chunks, lane `l` the chunks `32·j + l` (`j <
/// NV_CHUNKS_PER_LANE`): it issues all its 32-bit code loads, E4M3 byte loads and its tensor
/// scale load, then decodes and stores each chunk with one 16-byte store, so every load and
/// store instruction of a warp covers contiguous bytes (128 of codes, 64 of scale bytes every
/// other byte, 512 of output). When a lane's chunks lie in one group (all but the lanes whose
/// chunks straddle a group's or an expert's end) their addresses are constant offsets of the
/// first and they share one tensor scale; otherwise each chunk is located on its own. A lane's
/// position is carried from step to step by [`NvChunks::advance`] (no division per step); all
/// offsets are 64-bit.
///
/// # Safety
/// Launch contract: 1-D grid and block, the block a multiple of 32 threads, no shared memory;
/// `packed` holds `E·n·k/2` bytes, `scales` `E·n·k/16` bytes and (when its address is not 0)
/// `tensor_scales` `E·groups` f32, with `E = num_experts`, `groups ≥ 1` dividing `n`; `experts`
/// holds `num_selected` u32; `out` holds `num_selected·n·k` bf16; `k % 16 == 0`; all buffers
/// 16-byte aligned. Entries of `experts` that are `≥ num_experts` are skipped (the host rejects
/// them before launch). NaN or negative E4M3 bytes are refused by the host's container before
/// any launch (here they give NaN or negated values, never a fault).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_dequant_nvfp4_bf16(p: DequantParams) {
    // Without tensor scales the whole expert is one group (`groups` is then irrelevant).
    let groups = if p.tensor_scales_addr != 0 {
        p.groups as u64
    } else {
        1
    };
    let Some(geo) = NvChunks::new(p.n, p.k, groups) else {
        return;
    };
    let sel = Selection::of(&p, geo.per_expert());
    let total = sel.total();
    let num_selected = p.num_selected as u64;
    // Lane `lane` of global warp `g / 32` (blocks are whole warps: launch contract); the warps
    // of the grid advance together by `step` chunks.
    let (g, threads) = grid_stride();
    let lane = g % 32;
    let step = geo.locate(threads / 32 * NV_WARP_CHUNKS);
    let mut pos = geo.locate(g / 32 * NV_WARP_CHUNKS + lane);

    // `pos` is this lane's first chunk, so it is `< total` exactly when its slot is
    // `< num_selected`.
    while pos.slot < num_selected {
        let c = geo.index(pos);
        if geo.lane_in_one_group(pos) {
            // All of this lane's chunks `c + 32·j` lie in `pos`'s group of slot `pos.slot`, so
            // they are `< total`.
            // SAFETY: `pos.slot < num_selected` (loop condition).
            let e = unsafe { sel.expert(pos.slot) };
            if e < sel.num_experts {
                // Chunk `src + 32·j` of `packed` is chunk `within + 32·j < per_group` of group
                // `pos.group` of expert `e < E`, whose tensor scale is at `ts_idx < E·groups`.
                let (src, ts_idx) = geo.source(pos, e as u64);
                // All loads first, then the decodes and stores (a store may alias a later load
                // as far as the compiler knows, so it would not hoist them itself).
                // SAFETY: `ts_idx < E·groups` (above).
                let ts = unsafe { tensor_scale(&p, ts_idx) };
                let fetched: [(u32, u8); NV_CHUNKS_PER_LANE as usize] =
                    // SAFETY: `src + 32·j < E·n·k/8` (above).
                    core::array::from_fn(|j| unsafe { fetch_chunk_nv(&p, src, j as u64) });
                for (j, &(word, scale)) in fetched.iter().enumerate() {
                    // SAFETY: `c + 32·j < total`: the 16 bytes at `16·(c + 32·j)` lie in `out`
                    // (`num_selected·n·k` bf16), 16-byte aligned.
                    unsafe {
                        store_16(
                            p.out_addr + 16 * c + 512 * j as u64,
                            decode_chunk_nv(word, scale, ts),
                        )
                    };
                }
            }
        } else {
            // The lane's chunks cross the end of a group, a slot or the output: each on its own.
            for j in 0..NV_CHUNKS_PER_LANE {
                let cj = c + 32 * j;
                if cj < total {
                    let q = geo.locate(cj);
                    // SAFETY: `q.slot = cj / per_expert < num_selected` since `cj < total`.
                    let e = unsafe { sel.expert(q.slot) };
                    if e < sel.num_experts {
                        let (src, ts_idx) = geo.source(q, e as u64);
                        // SAFETY: `e < E`, `q.group < groups` and `q.within < per_group`, so
                        // `src < E·n·k/8` and `ts_idx < E·groups`; `cj < total`.
                        unsafe {
                            let ts = tensor_scale(&p, ts_idx);
                            let (word, scale) = fetch_chunk_nv(&p, src, 0);
                            store_16(p.out_addr + 16 * cj, decode_chunk_nv(word, scale, ts));
                        }
                    }
                }
            }
        }
        pos = geo.advance(pos, step);
    }
}
