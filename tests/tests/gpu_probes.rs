//! GPU probes of the `ptx/` wrappers: special registers, cp.async with zero fill, every ldmatrix
//! form feeding mma.sync, bf16 conversion and multiply. Each is checked against the CPU.

use mxmoe::kernels::probes;
use mxmoe::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits, round_bf16};
use mxmoe_tests::{Rng, gpu};

#[test]
fn sreg_probe_reports_thread_coordinates() {
    let Some(gpu) = gpu() else { return };
    let (blocks, threads) = (3, 96);
    let got = probes::sreg(gpu, blocks, threads).unwrap();
    for (g, v) in got.iter().enumerate() {
        let (b, t) = (g as u32 / threads, g as u32 % threads);
        assert_eq!(*v, [t, b, t % 32, t / 32], "global thread {g}");
    }
}

#[test]
fn cp_async_probe_copies_and_zero_fills() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(11);
    for len in [0usize, 1, 15, 16, 17, 200, 511, 512] {
        let input: Vec<u8> = (0..len).map(|_| rng.below(255) as u8 + 1).collect();
        let got = probes::cp_async(gpu, &input).unwrap();
        assert_eq!(&got[..len], &input[..], "copied bytes, len {len}");
        assert!(
            got[len..].iter().all(|&b| b == 0),
            "zero fill after {len} bytes"
        );
    }
}

#[test]
fn mma_probe_matches_cpu_product_for_all_ldmatrix_forms() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(12);
    for _ in 0..4 {
        let a: Vec<u16> = (0..256).map(|_| f32_to_bf16_bits(rng.normal())).collect();
        let b: Vec<u16> = (0..128).map(|_| f32_to_bf16_bits(rng.normal())).collect();
        let got = probes::mma(
            gpu,
            a.as_slice().try_into().unwrap(),
            b.as_slice().try_into().unwrap(),
        )
        .unwrap();
        let mut expect = vec![0f32; 128];
        for m in 0..16 {
            for n in 0..8 {
                let mut acc = 0f64;
                for k in 0..16 {
                    acc += bf16_bits_to_f32(a[m * 16 + k]) as f64
                        * bf16_bits_to_f32(b[k * 8 + n]) as f64;
                }
                expect[m * 8 + n] = acc as f32;
            }
        }
        // bf16 products are exact in f32; the tensor core's f32 sums of 16 terms differ from the
        // f64 sum by a few f32 ulps of the magnitudes involved (|terms| ≲ 16 here).
        mxmoe_tests::assert_close("mma (ldmatrix)", &got.non_trans, &expect, 1e-4, 1e-5);
        mxmoe_tests::assert_close("mma (ldmatrix.trans)", &got.trans, &expect, 1e-4, 1e-5);
    }
}

#[test]
fn cvt_probe_rounds_like_the_shared_bf16_code() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(13);
    let mut pairs: Vec<(f32, f32)> = (0..1000)
        .map(|_| (rng.normal() * 100.0, f32::from_bits(rng.next_u64() as u32)))
        .collect();
    // Exact ties, infinities, the largest finite value and subnormals.
    pairs.extend([
        (1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)),
        (f32::INFINITY, -f32::MAX),
        (1e-40, -3e-39),
    ]);
    let got = probes::cvt(gpu, &pairs).unwrap();
    for (i, (&(lo, hi), &(packed, squared))) in pairs.iter().zip(&got).enumerate() {
        let (elo, ehi) = (f32_to_bf16_bits(lo), f32_to_bf16_bits(hi));
        let same = |g: u16, e: u16| {
            g == e || (bf16_bits_to_f32(g).is_nan() && bf16_bits_to_f32(e).is_nan())
        };
        assert!(
            same(packed as u16, elo) && same((packed >> 16) as u16, ehi),
            "pair {i}: {lo} {hi} -> {packed:08x}"
        );
        for (half, e) in [(squared as u16, elo), ((squared >> 16) as u16, ehi)] {
            let v = bf16_bits_to_f32(e);
            let expect = f32_to_bf16_bits(round_bf16(v * v));
            assert!(
                same(half, expect),
                "pair {i}: square of {v}: got {half:04x} expected {expect:04x}"
            );
        }
    }
}
