//! GPU dequantization against the shared decode: exhaustive codes × scale bytes, and fresh
//! random experts with a selected subset, bit for bit; MXFP4 and NVFP4 (the NVFP4 kernel's
//! walk: tensor-scale groups, lanes straddling a group's or an expert's end, a partial last
//! warp, several grid-stride steps).

use mxmoe::device::{download, upload};
use mxmoe::kernels::dequant::{dequant_mxfp4_bf16, dequant_nvfp4_bf16};
use mxmoe::nvfp4::{NvShape, NvWeights, dequantize_nvfp4_bf16};
use mxmoe::op::NvExperts;
use mxmoe::shared::bf16::f32_to_bf16_bits;
use mxmoe::shared::mxfp4::{MX_BLOCK, dequant_bf16_bits, e2m1_to_f32, unpack_pair};
use mxmoe::shared::nvfp4::{NV_BLOCK, block_factor};
use mxmoe_tests::{Rng, gpu};

/// CPU dequantization of one expert row-block straight from the shared decode functions.
fn cpu_dequant(packed: &[u8], scales: &[u8], n: usize, k: usize, experts: &[u32]) -> Vec<u16> {
    let mut out = Vec::with_capacity(experts.len() * n * k);
    for &e in experts {
        for row in 0..n {
            for kk in 0..k {
                let byte = packed[(e as usize * n + row) * k / 2 + kk / 2];
                let (lo, hi) = unpack_pair(byte);
                let code = if kk % 2 == 0 { lo } else { hi };
                let scale = scales[(e as usize * n + row) * (k / MX_BLOCK) + kk / MX_BLOCK];
                out.push(dequant_bf16_bits(code, scale));
            }
        }
    }
    out
}

/// `n` rows of `k` codes, each row the 16 codes in order (repeated), packed two per byte (even
/// k in the low nibble), and two scale bytes per row, both `r` for row `r`: every code under
/// every scale byte once `n` = 256.
fn every_code_and_scale_byte(n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    let packed = (0..n)
        .flat_map(|_| (0..k / 2).map(|j| ((2 * j) % 16) as u8 | ((((2 * j + 1) % 16) as u8) << 4)))
        .collect();
    let scales = (0..n).flat_map(|r| [r as u8, r as u8]).collect();
    (packed, scales)
}

#[test]
fn dequant_is_bit_exact_for_every_code_and_scale_byte() {
    let Some(gpu) = gpu() else { return };
    // One expert, 256 rows (one per scale byte), K = 64: every row holds all 16 codes twice in
    // each of its two blocks, and block q of row r uses scale byte r.
    let (n, k) = (256usize, 64usize);
    let (packed, scales) = every_code_and_scale_byte(n, k);
    let d_packed = upload(gpu, &packed).unwrap();
    let d_scales = upload(gpu, &scales).unwrap();
    let out = dequant_mxfp4_bf16(gpu, &d_packed, &d_scales, 1, n, k, &[0]).unwrap();
    let got = download(gpu, &out).unwrap();
    let expect = cpu_dequant(&packed, &scales, n, k, &[0]);
    for (i, (&g, &e)) in got.iter().zip(&expect).enumerate() {
        assert_eq!(
            g,
            e,
            "row {} k {}: got {g:04x} expected {e:04x}",
            i / k,
            i % k
        );
    }
}

#[test]
fn dequant_selected_experts_matches_cpu_on_random_data() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(21);
    for &(e, n, k) in &[(8usize, 48usize, 32usize), (5, 130, 256), (3, 7, 2048)] {
        let packed: Vec<u8> = (0..e * n * k / 2).map(|_| rng.next_u64() as u8).collect();
        // Realistic scale bytes around 2^0, plus a few extremes.
        let scales: Vec<u8> = (0..e * n * k / MX_BLOCK)
            .map(|_| match rng.below(50) {
                0 => 0,
                1 => 254,
                2 => 255,
                _ => 110 + rng.below(30) as u8,
            })
            .collect();
        let selected: Vec<u32> = vec![e as u32 - 1, 0, (e / 2) as u32];
        let d_packed = upload(gpu, &packed).unwrap();
        let d_scales = upload(gpu, &scales).unwrap();
        let out = dequant_mxfp4_bf16(gpu, &d_packed, &d_scales, e, n, k, &selected).unwrap();
        let got = download(gpu, &out).unwrap();
        let expect = cpu_dequant(&packed, &scales, n, k, &selected);
        assert_eq!(got.len(), expect.len());
        let first_bad = got.iter().zip(&expect).position(|(g, x)| g != x);
        assert!(
            first_bad.is_none(),
            "shape ({e},{n},{k}): first mismatch at {first_bad:?}"
        );
    }
}

#[test]
fn dequant_rejects_out_of_range_experts_and_bad_k() {
    let Some(gpu) = gpu() else { return };
    let packed = upload(gpu, &[0u8; 32]).unwrap();
    let scales = upload(gpu, &[127u8; 2]).unwrap();
    assert!(dequant_mxfp4_bf16(gpu, &packed, &scales, 1, 2, 32, &[1]).is_err());
    assert!(dequant_mxfp4_bf16(gpu, &packed, &scales, 1, 2, 48, &[0]).is_err());
    assert!(
        dequant_mxfp4_bf16(gpu, &packed, &scales, 1, 4, 32, &[0]).is_err(),
        "buffers too short"
    );
}

/// NVFP4 with raw bytes (no container check): every E4M3 byte (row `r` of 256 uses byte `r` for
/// both of its blocks: subnormal, NaN and negative bytes included) times every code, under no
/// tensor scale and under 4 tensor-scale groups of 64 rows whose scales take the fold's one- and
/// two-product routes and subnormal products. Bit for bit `bf16(e2m1 · (ts · e4m3))`; a NaN
/// only needs to be a NaN (the host rounds NaN to 0x7FC0, the device's conversion to 0x7FFF).
#[test]
fn nvfp4_dequant_is_bit_exact_for_every_code_and_e4m3_byte() {
    let Some(gpu) = gpu() else { return };
    let (n, k) = (256usize, 32usize);
    let (packed, scales) = every_code_and_scale_byte(n, k);
    let d_packed = upload(gpu, &packed).unwrap();
    let d_scales = upload(gpu, &scales).unwrap();
    let groups = 4;
    let ts = [3.7e-5f32, 0.123_456_79, 97.3, 1.0e-38];
    let d_ts = upload(gpu, &ts).unwrap();
    for (tensor_scales, tag) in [(None, "no tensor scale"), (Some(&d_ts), "4 groups")] {
        let out = dequant_nvfp4_bf16(
            gpu,
            &d_packed,
            &d_scales,
            tensor_scales,
            groups,
            1,
            n,
            k,
            &[0],
        )
        .unwrap();
        let got = download(gpu, &out).unwrap();
        for (i, &g) in got.iter().enumerate() {
            let (row, kk) = (i / k, i % k);
            let byte = packed[i / 2];
            let code = if kk % 2 == 0 { byte & 0xF } else { byte >> 4 };
            let t = match tensor_scales {
                Some(_) => ts[row / (n / groups)],
                None => 1.0,
            };
            let f = block_factor(scales[row * (k / NV_BLOCK) + kk / NV_BLOCK], t);
            let want = f32_to_bf16_bits(e2m1_to_f32(code) * f);
            let nan = |b: u16| b & 0x7FFF > 0x7F80;
            assert!(
                g == want || (nan(g) && nan(want)),
                "{tag}: row {row} k {kk}: got {g:04x} expected {want:04x}"
            );
        }
    }
}

/// Valid NVFP4 weights `[e, n, k]` with random codes, E4M3 bytes from 0x08 to 0x5F (factors
/// below and above 4 with the tensor scales used) and, when `groups > 0`, `groups` distinct
/// tensor scales per expert.
fn random_nv(rng: &mut Rng, (e, n, k): (usize, usize, usize), groups: usize) -> NvWeights {
    let packed: Vec<u8> = (0..e * n * k / 2).map(|_| rng.next_u64() as u8).collect();
    let scales: Vec<u8> = (0..e * n * k / NV_BLOCK)
        .map(|_| 0x08 + rng.below(0x58) as u8)
        .collect();
    let shape = NvShape::new(e, n, k).unwrap();
    if groups == 0 {
        return NvWeights::from_parts(shape, packed, scales, None).unwrap();
    }
    let ts: Vec<f32> = (0..e * groups)
        .map(|i| [0.0371, 0.5, 1.7e-3, 0.29][i % 4] * (1.0 + 0.01 * i as f32))
        .collect();
    NvWeights::from_grouped_parts(shape, packed, scales, Some(ts), groups).unwrap()
}

/// The NVFP4 kernel against the host's dequantizer on shapes that reach every path of its
/// walk: a warp's last lanes past the output (chunk counts not a multiple of 128), groups
/// shorter than a lane's reach (every lane locates each chunk on its own), groups and experts
/// whose ends fall inside a lane's chunks, and an output of more than 17.3 M values (more than
/// one grid-stride step on an H100: at most 16 blocks of 256 threads per SM, 32 values each),
/// whose step is no multiple of a group or an expert. Selections out of order with a repeat;
/// without tensor scales also with `groups > 1` passed (which must not matter).
#[test]
fn nvfp4_dequant_matches_the_host_on_groups_tails_and_several_steps() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(0x4E56);
    // (e, n, k, groups; 0 = no tensor scales).
    let cases = [
        (3usize, 7usize, 48usize, 0usize),
        (3, 7, 48, 7),
        (5, 24, 96, 3),
        (4, 48, 1040, 3),
        (2, 1, 16, 1),
        (4, 4593, 1040, 3),
        (4, 4593, 1040, 0),
    ];
    for (e, n, k, groups) in cases {
        let w = random_nv(&mut rng, (e, n, k), groups);
        let host = dequantize_nvfp4_bf16(&w);
        let dev = NvExperts::upload(gpu, &w).unwrap();
        let ids: Vec<u32> = [e - 1, 0, e / 2, e / 2, 1 % e]
            .iter()
            .map(|&x| x as u32)
            .collect();
        let passed_groups = if groups == 0 {
            [1, 3]
        } else {
            [groups, groups]
        };
        for g in passed_groups {
            if !n.is_multiple_of(g) {
                continue;
            }
            let out = dequant_nvfp4_bf16(
                gpu,
                dev.packed(),
                dev.scales(),
                dev.tensor_scales(),
                g,
                e,
                n,
                k,
                &ids,
            )
            .unwrap();
            let got: Vec<u16> = download(gpu, &out).unwrap();
            assert_eq!(got.len(), ids.len() * n * k);
            for (s, &x) in ids.iter().enumerate() {
                let x = x as usize;
                let (a, b) = (&got[s * n * k..][..n * k], &host[x * n * k..][..n * k]);
                let first_bad = a.iter().zip(b).position(|(p, q)| p != q);
                assert!(
                    first_bad.is_none(),
                    "shape ({e},{n},{k}) groups {groups} (passed {g}), slot {s} (expert {x}): \
                     first mismatch at {first_bad:?}"
                );
            }
        }
    }
}
