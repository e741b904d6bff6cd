//! MXFP4 and NVFP4 → bf16 dequantization of selected experts (Strategy A's building block, SPEC
//! §4.1; NVFP4: issue #17).

use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::cvt::mul_rn_bf16x2;
use crate::shared::mxfp4::{
    E8M0_NAN, MX_BLOCK, MX_BLOCK_BYTES, byte_to_bf16x2, e2m1_to_f32, e8m0_to_bf16_bits,
};
use crate::shared::nvfp4::{NV_BLOCK, block_factor};
use crate::shared::params::DequantParams;
use crate::tile::gmem::{grid_stride, load, load_16, store_16};

/// Which experts a dequant kernel decodes: `experts[0..num_selected]` (u32, each checked
/// against `num_experts`), each `blocks_per_expert` scale blocks.
#[derive(Clone, Copy)]
struct Selection {
    experts_addr: u64,
    num_selected: u32,
    num_experts: u32,
    blocks_per_expert: u64,
}

impl Selection {
    /// The selection of `p`, whose experts have `blocks_per_expert` scale blocks each.
    #[inline(always)]
    fn of(p: &DequantParams, blocks_per_expert: u64) -> Self {
        Self {
            experts_addr: p.experts_addr,
            num_selected: p.num_selected,
            num_experts: p.num_experts,
            blocks_per_expert,
        }
    }
}

/// The grid-stride loop of both dequant kernels: `body(item, e, within)` for every output block
/// `item < num_selected·blocks_per_expert` of this thread whose expert `e = experts[item /
/// blocks_per_expert]` is `< num_experts` (`within`: the block's index inside its expert, `n ·
/// blocks_per_row + q`). Entries `≥ num_experts` are skipped.
///
/// # Safety
/// `experts_addr` holds `num_selected` u32.
#[inline(always)]
unsafe fn for_each_selected_block(sel: Selection, mut body: impl FnMut(u64, u32, u64)) {
    let total = sel.num_selected as u64 * sel.blocks_per_expert;
    let (mut item, stride) = grid_stride();
    while item < total {
        // SAFETY: `item / blocks_per_expert < num_selected`, the length of `experts`.
        let e: u32 = unsafe { load(sel.experts_addr + 4 * (item / sel.blocks_per_expert)) };
        if e < sel.num_experts {
            body(item, e, item % sel.blocks_per_expert);
        }
        item += stride;
    }
}

/// Decodes the 4 packed bytes of `word` into 4 bf16x2 words scaled by `scale2` (the scale's bf16
/// bits in both halves). The products are exact, so `mul.rn` rounds nothing; NaN scales give the
/// canonical NaN `0x7FC0` in every lane (the caller substitutes it).
#[inline(always)]
fn decode_word(word: u32, scale2: u32) -> [u32; 4] {
    let d = |j: u32| mul_rn_bf16x2(byte_to_bf16x2((word >> (8 * j)) as u8), scale2);
    [d(0), d(1), d(2), d(3)]
}

/// `out[s, n, k] = e2m1(code) · 2^(scale − 127)` as bf16 for every selected expert `experts[s]`,
/// output row `n` and `k`. One thread decodes one 32-element scale block (16 packed bytes, one
/// scale byte, 64 output bytes) per grid-stride step; all offsets are 64-bit.
///
/// Numerics: bit-identical to torchao's `dequantize(bf16)` and to the CPU dequantizer, with a NaN
/// scale byte (255) giving `0x7FC0` for all 32 elements.
///
/// # Safety
/// Launch contract: 1-D grid and block, no shared memory; `packed` holds `E·n·k/2` bytes and
/// `scales` `E·n·k/32` bytes with `E = num_experts`; `experts` holds `num_selected` u32; `out`
/// holds `num_selected·n·k` bf16; `k % 32 == 0`; all buffers 16-byte aligned. Entries of
/// `experts` that are `≥ num_experts` are skipped (the host rejects them before launch).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_dequant_mxfp4_bf16(p: DequantParams) {
    let blocks_per_expert = p.n * (p.k / MX_BLOCK as u64);
    let sel = Selection::of(&p, blocks_per_expert);
    let decode = |item: u64, e: u32, within: u64| {
        let src_block = e as u64 * blocks_per_expert + within;
        // SAFETY: `src_block < E·n·k/32`, so 16 bytes at `16·src_block` lie in `packed`
        // (16-aligned since the buffer is) and one byte at `src_block` lies in `scales`.
        let (codes, scale) = unsafe {
            (
                load_16(p.packed_addr + MX_BLOCK_BYTES as u64 * src_block),
                load::<u8>(p.scales_addr + src_block),
            )
        };
        let sb = e8m0_to_bf16_bits(scale) as u32;
        let scale2 = sb | (sb << 16);
        let dst = p.out_addr + 2 * MX_BLOCK as u64 * item;
        let nan = scale == E8M0_NAN;
        // Four explicit 16-byte stores keep every array index a compile-time constant
        // (a run-time index would put the array in local memory).
        let v0 = if nan {
            [0x7FC0_7FC0; 4]
        } else {
            decode_word(codes[0], scale2)
        };
        let v1 = if nan {
            [0x7FC0_7FC0; 4]
        } else {
            decode_word(codes[1], scale2)
        };
        let v2 = if nan {
            [0x7FC0_7FC0; 4]
        } else {
            decode_word(codes[2], scale2)
        };
        let v3 = if nan {
            [0x7FC0_7FC0; 4]
        } else {
            decode_word(codes[3], scale2)
        };
        // SAFETY: `item < num_selected·n·k/32`: the 64 output bytes of this block are inside
        // `out`; 16-byte aligned.
        unsafe {
            store_16(dst, v0);
            store_16(dst + 16, v1);
            store_16(dst + 32, v2);
            store_16(dst + 48, v3);
        }
    };
    // SAFETY: `experts` holds `num_selected` u32 (launch contract).
    unsafe { for_each_selected_block(sel, decode) };
}

/// Decodes the 4 packed bytes of `word` (8 codes, even k in each byte's low nibble) into 4 bf16x2
/// words: `bf16(e2m1(code) · factor)`, the f32 product rounded once (`cvt.rn`), as the host's
/// dequantizer and torchao's `NVFP4Tensor.dequantize(bf16)` do.
#[inline(always)]
fn decode_word_nv(word: u32, factor: f32) -> [u32; 4] {
    let d = |j: u32| {
        let byte = (word >> (8 * j)) as u8;
        cvt_rn_bf16x2_f32(
            e2m1_to_f32(byte & 0x0F) * factor,
            e2m1_to_f32(byte >> 4) * factor,
        )
    };
    [d(0), d(1), d(2), d(3)]
}

/// `out[s, n, k] = bf16(e2m1(code) · (tensor_scale · e4m3(scale)))` for every selected expert
/// `experts[s]`, row `n` and `k` (see [`DequantParams`]). One thread decodes one 16-element
/// block (8 packed bytes, one E4M3 byte, 32 output bytes) per grid-stride step; all offsets are
/// 64-bit. NaN or negative E4M3 bytes are refused by the host's container before any launch.
///
/// # Safety
/// Launch contract: 1-D grid and block, no shared memory; `packed` holds `E·n·k/2` bytes,
/// `scales` `E·n·k/16` bytes and (when its address is not 0) `tensor_scales` `E·groups` f32,
/// with `E = num_experts`, `groups ≥ 1` dividing `n`; `experts` holds `num_selected` u32; `out`
/// holds `num_selected·n·k` bf16; `k % 16 == 0`; all buffers 16-byte aligned. Entries of
/// `experts` that are `≥ num_experts` are skipped (the host rejects them before launch).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_dequant_nvfp4_bf16(p: DequantParams) {
    let blocks_per_row = p.k / NV_BLOCK as u64;
    let blocks_per_expert = p.n * blocks_per_row;
    // At least 1, so the division below has no zero-divisor path (`groups ≥ 1` dividing `n` by
    // contract).
    let rows_per_group = (p.n / (p.groups as u64).max(1)).max(1);
    let sel = Selection::of(&p, blocks_per_expert);
    let decode = |item: u64, e: u32, within: u64| {
        let src_block = e as u64 * blocks_per_expert + within;
        // SAFETY: `src_block < E·n·k/16`, so 8 bytes at `8·src_block` lie in `packed`
        // (8-aligned: the buffer is 16-aligned) and one byte at `src_block` in `scales`.
        let (lo, hi, scale) = unsafe {
            (
                load::<u32>(p.packed_addr + 8 * src_block),
                load::<u32>(p.packed_addr + 8 * src_block + 4),
                load::<u8>(p.scales_addr + src_block),
            )
        };
        let tensor_scale = if p.tensor_scales_addr != 0 {
            let group = (within / blocks_per_row) / rows_per_group;
            // SAFETY: `e < E` and `group < groups` (`n_idx < n`, `n = groups·rows_per_group`).
            unsafe { load::<f32>(p.tensor_scales_addr + 4 * (e as u64 * p.groups as u64 + group)) }
        } else {
            1.0
        };
        let factor = block_factor(scale, tensor_scale);
        let (v0, v1) = (decode_word_nv(lo, factor), decode_word_nv(hi, factor));
        let dst = p.out_addr + 2 * NV_BLOCK as u64 * item;
        // SAFETY: `item < num_selected·n·k/16`: the 32 output bytes of this block are inside
        // `out`; 16-byte aligned (32-byte steps from an aligned base).
        unsafe {
            store_16(dst, v0);
            store_16(dst + 16, v1);
        }
    };
    // SAFETY: `experts` holds `num_selected` u32 (launch contract).
    unsafe { for_each_selected_block(sel, decode) };
}
