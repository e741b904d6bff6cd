//! GPU dequantization against the shared decode: exhaustive codes × scale bytes, and fresh
//! random experts with a selected subset, bit for bit.

use mxmoe::device::{download, upload};
use mxmoe::kernels::dequant::dequant_mxfp4_bf16;
use mxmoe::shared::mxfp4::{MX_BLOCK, dequant_bf16_bits, unpack_pair};
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

#[test]
fn dequant_is_bit_exact_for_every_code_and_scale_byte() {
    let Some(gpu) = gpu() else { return };
    // One expert, 256 rows (one per scale byte), K = 64: every row holds all 16 codes twice in
    // each of its two blocks, and block q of row r uses scale byte r.
    let (n, k) = (256usize, 64usize);
    let mut packed = Vec::with_capacity(n * k / 2);
    for _ in 0..n {
        for j in 0..k / 2 {
            packed.push(((2 * j) % 16) as u8 | ((((2 * j + 1) % 16) as u8) << 4));
        }
    }
    let scales: Vec<u8> = (0..n).flat_map(|r| [r as u8, r as u8]).collect();
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
