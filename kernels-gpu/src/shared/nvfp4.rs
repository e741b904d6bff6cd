//! NVFP4 block-scale decoding, shared by the host's dequantizer (`mxmoe::nvfp4`), the
//! dequantization kernel (Strategy A) and the fused K-loop decode of the grouped GEMMs
//! (Strategy B, `tile::gemm` and `tile::wg`).
//!
//! NVFP4 keeps MXFP4's E2M1 codes and nibble order ([`super::mxfp4`]) but scales every
//! [`NV_BLOCK`] values along K by an E4M3 (`float8_e4m3fn`) byte and, optionally, an f32 tensor
//! scale. A value is `e2m1(code) · f` with the block factor `f = tensor_scale · e4m3(byte)` taken
//! in f32 first ([`block_factor`], torchao's `get_hp_scales`), and a bf16 dequantization rounds
//! that f32 product once. Unlike an E8M0 scale, `f` is not a power of two, so the product is not
//! exact: a decode that is to match the bf16 path on the dequantized weights bit for bit must
//! form the same f32 product and round it the same way.

/// Values per block scale.
pub const NV_BLOCK: usize = 16;
/// The largest E4M3 (`float8_e4m3fn`) value.
pub const E4M3_MAX: f32 = 448.0;
/// The smallest normal E4M3 value, 2^-6.
pub const E4M3_MIN_NORMAL: f32 = 0.015625;

/// The value of an E4M3 (`float8_e4m3fn`) byte: sign, 4 exponent bits (bias 7), 3 mantissa bits,
/// subnormals below 2^-6, `0x7F`/`0xFF` NaN, no infinities. Exact in f32.
#[inline]
pub const fn e4m3_to_f32(b: u8) -> f32 {
    let exp = ((b >> 3) & 0x0F) as u32;
    let man = (b & 0x07) as u32;
    if exp == 0x0F && man == 0x07 {
        return f32::NAN;
    }
    let sign = ((b as u32) >> 7) << 31;
    let magnitude = if exp == 0 {
        // man/8 · 2^-6 = man · 2^-9: exact as an integer times a power of two.
        man as f32 * (1.0 / 512.0)
    } else {
        // (1 + man/8) · 2^(exp − 7): the f32 bit pattern directly.
        f32::from_bits(((exp + 120) << 23) | (man << 20))
    };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// The f32 factor of a block: `tensor_scale · e4m3(byte)` (pass 1.0 without a tensor scale,
/// which leaves the E4M3 value unchanged).
#[inline]
pub const fn block_factor(byte: u8, tensor_scale: f32) -> f32 {
    tensor_scale * e4m3_to_f32(byte)
}

/// `2^126` as an f32.
pub const TWO_POW_126_F32: f32 = f32::from_bits(253 << 23);
/// `2^120` as an f32.
const TWO_POW_120_F32: f32 = f32::from_bits(247 << 23);

/// [`e4m3_to_f32`] without branches on the exponent: the byte's exponent and mantissa fields
/// placed at the top of an f32's (`(b & 0x7F) << 20`) are the E4M3 magnitude times 2^-120 for
/// normal and subnormal bytes alike (an E4M3 subnormal lands on an f32 subnormal), so one exact
/// product by 2^120 gives the value; `0x7F`/`0xFF` are NaN. Equal to [`e4m3_to_f32`] for every
/// byte (host test below); the kernels' decode uses it (a few instructions per 16 values).
#[inline(always)]
pub const fn e4m3_to_f32_placed(b: u8) -> f32 {
    let b = b as u32;
    if b & 0x7F == 0x7F {
        return f32::NAN;
    }
    let placed = f32::from_bits(((b & 0x7F) << 20) | ((b & 0x80) << 24));
    placed * TWO_POW_120_F32
}

/// The f32 multipliers that turn placed E2M1 codes into one NVFP4 block's decoded values.
///
/// The kernels place a byte's two codes into bf16 bit fields scaled by 2^-126
/// (`mxfp4::place_byte_scaled_down`; widened to f32 exactly by a shift). A value is then
/// `bf16(rn_f32(x · 2^126 · f))` for the block factor `f` ([`block_factor`]): for `|f| < 4`
/// the product by `f · 2^126` (finite and exact) has the same real value as `e2m1 · f`, so its
/// one f32 rounding is the dequantizer's; otherwise two products, by 2^126 (exact) and then by
/// `f`. NaN factors take the second route and stay NaN. Either way the bf16 result equals
/// `bf16(e2m1(code) · f)` rounded as `dequantize` does, bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NvFold {
    /// First multiplier.
    pub first: f32,
    /// Second multiplier, used only when `two_step`.
    pub second: f32,
    /// Whether the second product is needed.
    pub two_step: bool,
}

/// [`NvFold`] of a block factor `f`.
#[inline(always)]
pub const fn nv_fold(f: f32) -> NvFold {
    if f.abs() < 4.0 {
        NvFold {
            first: f * TWO_POW_126_F32,
            second: 1.0,
            two_step: false,
        }
    } else {
        NvFold {
            first: TWO_POW_126_F32,
            second: f,
            two_step: true,
        }
    }
}

/// The two placed values of a bf16x2 word (`mxfp4::place_byte_scaled_down`), widened to f32
/// (even k first), times `fold`: the f32 values whose bf16 rounding is the decoded pair.
#[inline(always)]
pub const fn nv_scale_pair(placed: u32, fold: NvFold) -> (f32, f32) {
    let lo = f32::from_bits(placed << 16) * fold.first;
    let hi = f32::from_bits(placed & 0xFFFF_0000) * fold.first;
    if fold.two_step {
        (lo * fold.second, hi * fold.second)
    } else {
        (lo, hi)
    }
}

/// Values of one chunk of the NVFP4 dequantization kernel: 4 packed bytes (one 32-bit load),
/// half a [`NV_BLOCK`] (so exactly one E4M3 byte, `k` being a multiple of 16), 16 output bytes
/// (one 16-byte store).
pub const NV_CHUNK: u64 = 8;
/// Chunks per lane and grid-stride step of the NVFP4 dequantization kernel: lane `l` of a warp
/// owns chunks `c + 32·j` (`j <` this) of the warp's [`NV_WARP_CHUNKS`].
pub const NV_CHUNKS_PER_LANE: u64 = 4;
/// Consecutive chunks a warp covers per grid-stride step.
pub const NV_WARP_CHUNKS: u64 = 32 * NV_CHUNKS_PER_LANE;

/// The chunk geometry of an NVFP4 dequantization of `[num_selected, n, k]`: the output of each
/// selection slot (`n·k/8` chunks) is `groups` tensor-scale groups of `per_group` chunks each
/// (`n/groups` rows; `groups = 1` without tensor scales). Chunk `c` of the output sits at
/// [`NvChunkPos`] `(slot, group, within)` with `c = (slot·groups + group)·per_group + within`;
/// the kernel carries a lane's position from step to step with [`NvChunks::advance`] (no
/// division per step) and divides only where a lane's chunks straddle a group's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvChunks {
    /// Chunks per tensor-scale group, `(n/groups)·(k/8)` (> 0).
    per_group: u64,
    /// Tensor-scale groups per expert (≥ 1).
    groups: u64,
    /// Chunks per expert, `groups·per_group` (> 0; kept so that the divisors are known
    /// non-zero where they are used).
    per_expert: u64,
}

/// Where a chunk lies: selection slot, tensor-scale group of the slot's expert, and index inside
/// the group (`< per_group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvChunkPos {
    /// Selection slot (output expert index).
    pub slot: u64,
    /// Tensor-scale group inside the slot (`< groups`).
    pub group: u64,
    /// Chunk index inside the group (`< per_group`).
    pub within: u64,
}

impl NvChunks {
    /// The geometry of `n` rows of `k` values in `groups` groups (0 is taken as 1), or `None`
    /// when an expert has no chunk (`n < groups`, `k < 8`) or its chunk count overflows u64.
    /// `groups` must divide `n` for the output to be covered (the launch contract); otherwise
    /// only the first `groups·(n/groups)` rows of each expert are.
    #[inline(always)]
    pub const fn new(n: u64, k: u64, groups: u64) -> Option<Self> {
        let groups = if groups == 0 { 1 } else { groups };
        let per_group = match (n / groups).checked_mul(k / NV_CHUNK) {
            Some(0) | None => return None,
            Some(per_group) => per_group,
        };
        match per_group.checked_mul(groups) {
            Some(per_expert) if per_expert != 0 => Some(Self {
                per_group,
                groups,
                per_expert,
            }),
            _ => None,
        }
    }

    /// Chunks per expert, `groups·per_group`.
    #[inline(always)]
    pub const fn per_expert(&self) -> u64 {
        self.per_expert
    }

    /// Chunks per tensor-scale group.
    #[inline(always)]
    pub const fn per_group(&self) -> u64 {
        self.per_group
    }

    /// The position of chunk `c` (two divisions; the kernel calls it at its start and for the
    /// chunks of lanes that straddle a group's end).
    #[inline(always)]
    pub const fn locate(&self, c: u64) -> NvChunkPos {
        let rest = c % self.per_expert;
        NvChunkPos {
            slot: c / self.per_expert,
            group: rest / self.per_group,
            within: rest % self.per_group,
        }
    }

    /// The chunk index of `pos`.
    #[inline(always)]
    pub const fn index(&self, pos: NvChunkPos) -> u64 {
        (pos.slot * self.groups + pos.group) * self.per_group + pos.within
    }

    /// The position of chunk `index(pos) + index(step)`, for a `step` from [`NvChunks::locate`]
    /// (each field in range): adds field by field and carries once per field.
    #[inline(always)]
    pub const fn advance(&self, pos: NvChunkPos, step: NvChunkPos) -> NvChunkPos {
        let mut within = pos.within + step.within;
        let mut group = pos.group + step.group;
        let mut slot = pos.slot + step.slot;
        if within >= self.per_group {
            within -= self.per_group;
            group += 1;
        }
        if group >= self.groups {
            group -= self.groups;
            slot += 1;
        }
        NvChunkPos {
            slot,
            group,
            within,
        }
    }

    /// Whether all of a lane's chunks `index(pos) + 32·j` (`j < NV_CHUNKS_PER_LANE`) lie in
    /// `pos`'s group (so in its slot, one tensor scale, and each at a constant offset from the
    /// first, in the output and in the source alike).
    #[inline(always)]
    pub const fn lane_in_one_group(&self, pos: NvChunkPos) -> bool {
        pos.within + (NV_WARP_CHUNKS - 32) < self.per_group
    }

    /// For chunk `pos` of expert `e`: its chunk index in `packed [E, n, k/2]` (its 4 bytes at
    /// 4× it, its E4M3 byte at half of it) and the index of its tensor scale in
    /// `tensor_scales [E, groups]`.
    #[inline(always)]
    pub const fn source(&self, pos: NvChunkPos, e: u64) -> (u64, u64) {
        let scale_idx = e * self.groups + pos.group;
        (scale_idx * self.per_group + pos.within, scale_idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::bf16::f32_to_bf16_bits;
    use crate::shared::mxfp4::{e2m1_to_f32, place_byte_scaled_down};

    /// The chunks of output chunk `c` as the NVFP4 dequantization kernel's walk reaches them: a
    /// host mirror of its loop (`kernels/dequant.rs`) over a grid of `threads` threads. Returns,
    /// per output chunk, every `(source chunk, tensor-scale index)` written to it.
    fn walk(
        (n, k, groups): (u64, u64, u64),
        experts: &[u32],
        num_experts: u32,
        threads: u64,
    ) -> Vec<Vec<(u64, u64)>> {
        let geo = NvChunks::new(n, k, groups).unwrap();
        let num_selected = experts.len() as u64;
        let total = num_selected * geo.per_expert();
        let mut writes = vec![Vec::new(); total as usize];
        let step = geo.locate(threads / 32 * NV_WARP_CHUNKS);
        for g in 0..threads {
            let mut pos = geo.locate(g / 32 * NV_WARP_CHUNKS + g % 32);
            while pos.slot < num_selected {
                let c = geo.index(pos);
                if geo.lane_in_one_group(pos) {
                    let e = experts[pos.slot as usize];
                    if e < num_experts {
                        let (src, ts) = geo.source(pos, e as u64);
                        for j in 0..NV_CHUNKS_PER_LANE {
                            writes[(c + 32 * j) as usize].push((src + 32 * j, ts));
                        }
                    }
                } else {
                    for j in 0..NV_CHUNKS_PER_LANE {
                        let cj = c + 32 * j;
                        if cj < total {
                            let q = geo.locate(cj);
                            let e = experts[q.slot as usize];
                            if e < num_experts {
                                writes[cj as usize].push(geo.source(q, e as u64));
                            }
                        }
                    }
                }
                pos = geo.advance(pos, step);
            }
        }
        writes
    }

    #[test]
    fn dequant_chunk_walk_writes_every_chunk_once_from_its_source() {
        // (n, k, groups): one chunk per expert, groups shorter than a lane's reach (96 chunks),
        // K = 16 (one block per row), odd row counts, groups longer than a warp's 128 chunks.
        let shapes = [
            (1u64, 16u64, 1u64),
            (7, 48, 1),
            (24, 96, 1),
            (24, 96, 3),
            (12, 16, 4),
            (130, 256, 2),
            (48, 1040, 3),
            (5, 2048, 5),
        ];
        // Out of order, a repeat, and entries >= num_experts (skipped: left unwritten).
        let (experts, num_experts) = ([4u32, 0, 9, 2, 2, 5, 1], 5u32);
        for (n, k, groups) in shapes {
            let per_expert = n * k / NV_CHUNK;
            let rows_per_group = n / groups;
            let grids = [32u64, 96, 256, 1024, 8 * 1024];
            for threads in grids {
                let writes = walk((n, k, groups), &experts, num_experts, threads);
                for (c, w) in writes.iter().enumerate() {
                    let c = c as u64;
                    let (slot, at) = (c / per_expert, c % per_expert);
                    let e = experts[slot as usize] as u64;
                    let tag = format!("n {n} k {k} groups {groups} threads {threads} chunk {c}");
                    if e >= num_experts as u64 {
                        assert!(w.is_empty(), "{tag}: skipped expert written");
                        continue;
                    }
                    let row = at * NV_CHUNK / k;
                    let src = e * per_expert + at;
                    let ts = e * groups + row / rows_per_group;
                    assert_eq!(w, &[(src, ts)], "{tag}");
                    // The chunk's E4M3 byte (at src / 2) is its block's: row-major [E, n, k/16].
                    let kk = at * NV_CHUNK % k;
                    assert_eq!(src / 2, (e * n + row) * (k / 16) + kk / 16, "{tag}");
                }
            }
        }
    }

    #[test]
    fn dequant_chunk_geometry_refuses_empty_experts_and_carries_like_division() {
        assert_eq!(NvChunks::new(0, 16, 1), None);
        assert_eq!(NvChunks::new(4, 0, 1), None);
        assert_eq!(NvChunks::new(2, 16, 3), None, "fewer rows than groups");
        assert_eq!(NvChunks::new(u64::MAX / 2, 64, 1), None, "overflow");
        let geo = NvChunks::new(6, 32, 0).unwrap();
        assert_eq!((geo.per_group(), geo.groups, geo.per_expert()), (24, 1, 24));
        let geo = NvChunks::new(6, 32, 3).unwrap();
        assert_eq!((geo.per_group(), geo.groups, geo.per_expert()), (8, 3, 24));
        for start in 0..100 {
            for step in 0..100 {
                let pos = geo.advance(geo.locate(start), geo.locate(step));
                assert_eq!(pos, geo.locate(start + step), "{start} + {step}");
                assert_eq!(geo.index(pos), start + step);
            }
        }
    }

    #[test]
    fn placed_e4m3_decode_equals_the_definition_for_every_byte() {
        for b in 0u8..=255 {
            let (want, got) = (e4m3_to_f32(b), e4m3_to_f32_placed(b));
            if want.is_nan() {
                assert!(got.is_nan(), "{b:#04x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{b:#04x}");
            }
        }
    }

    #[test]
    fn folded_decode_equals_the_dequantizer_bit_for_bit() {
        // Tensor scales: 1 (none), typical small ones, odd mantissas (inexact products), large
        // (two-step route), subnormal, and the boundary at |f| = 4.
        let tensor_scales = [
            1.0f32,
            1.0 / 2688.0,
            3.7e-5,
            0.123_456_79,
            1.000_000_1,
            3.999_999_8,
            97.3,
            1.0e30,
            1.0e-40,
        ];
        for ts in tensor_scales {
            for sb in 0u8..=255 {
                let f = block_factor(sb, ts);
                let fold = nv_fold(f);
                for byte in 0u32..=255 {
                    let (lo, hi) = nv_scale_pair(place_byte_scaled_down(byte), fold);
                    for (code, got) in [(byte & 0xF, lo), (byte >> 4, hi)] {
                        let want = f32_to_bf16_bits(e2m1_to_f32(code as u8) * f);
                        let got = f32_to_bf16_bits(got);
                        if want & 0x7FFF > 0x7F80 {
                            assert!(
                                got & 0x7FFF > 0x7F80,
                                "ts {ts} scale {sb:#04x} byte {byte:#04x}"
                            );
                        } else {
                            assert_eq!(got, want, "ts {ts} scale {sb:#04x} byte {byte:#04x}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn e4m3_decodes_every_byte_as_the_format_defines() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            let (s, e, m) = ((b >> 7) as i32, ((b >> 3) & 0xF) as i32, (b & 7) as f64);
            if e == 15 && m == 7.0 {
                assert!(v.is_nan(), "{b:#04x}");
                continue;
            }
            let mag = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(v as f64, want, "{b:#04x}");
            assert_eq!(v.is_sign_negative(), s == 1, "{b:#04x} sign");
        }
        assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
        assert_eq!(e4m3_to_f32(0x08), E4M3_MIN_NORMAL);
        assert_eq!(block_factor(0x38, 1.0), 1.0);
        assert_eq!(block_factor(0x40, 0.25), 0.5);
    }
}
