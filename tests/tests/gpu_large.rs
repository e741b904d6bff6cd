//! 64-bit sizes: tensors past 2^31 elements, where any 32-bit offset arithmetic would wrap.
//!
//! - `L·N > 2^31` output elements (T = 32768, top-8, N = 8448, K = 32): the forward output
//!   (4.4 GB), read again by backward as the output gradient, for bf16 and MXFP4 fused weights,
//!   scattered and (bf16) grouped output. Sampled rows (the first, ones straddling and past
//!   element 2^31, the last) are checked against the CPU reference run on just the sampled tokens
//!   (their routing is the same, so each row is the same computation); dX is checked for the
//!   sampled tokens with `dy = out`.
//! - An expert stack past 2^31 elements (E = 512, N = 5120, K = 2048: 5.4e9 weights; MXFP4 packed
//!   bytes past 2^31, a bf16 copy past 2^32 elements), tokens routed only to experts ≥ 500: MXFP4
//!   fused, MXFP4 selective and bf16 (dequantized on the device) against the reference on a
//!   sliced problem holding only the used experts; LoRA gradients of unused experts are zero.
//!
//! The two tests hold about 5 GB and 14 GB of device memory (and 0.1 GB and 5 GB of host memory);
//! they run one at a time.

use std::sync::Mutex;

use mxmoe::Runtime;
use mxmoe::device::upload;
use mxmoe::kernels::dequant::dequant_mxfp4_bf16;
use mxmoe::mxfp4::{
    MxWeights, dequantize_experts_bf16, dequantize_experts_f32, dequantize_f32, quantize_mxfp4,
};
use mxmoe::op::{
    Bf16Matrix, DenseExperts, ExpertLinear, ExpertWeights, LoraWeights, MxExperts, RowOrder,
    Strategy, backward,
};
use mxmoe::reference::{self, LinearProblem, Rounding};
use mxmoe::routing::DeviceRouting;
use mxmoe::shared::bf16::bf16_bits_to_f32;
use mxmoe::tensor::{DType, DeviceLoc, TensorMeta};
use mxmoe_tests::linear_case::{Case, draw, upload_lora};
use mxmoe_tests::{Rng, assert_close, gpu};

const RTOL: f32 = 1e-2;
const ATOL_FRAC: f32 = 4e-3;

/// The tests of this file each hold gigabytes of device memory: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `atol = ATOL_FRAC·max|expected|` (plus a floor for all-zero tensors).
fn atol(expected: &[f32]) -> f32 {
    ATOL_FRAC * expected.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-6
}

/// Downloads the listed rows of a device matrix as f32 (row-major, in the listed order).
fn download_rows(gpu: &Runtime, m: &Bf16Matrix, rows: &[usize]) -> Vec<f32> {
    let cols = m.cols();
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        assert!(r < m.rows());
        let bits = gpu
            .stream()
            .clone_dtoh(&m.data().slice(r * cols..(r + 1) * cols))
            .expect("downloading a row");
        out.extend(bits.into_iter().map(bf16_bits_to_f32));
    }
    out
}

/// Asserts that every row of `values` (`cols` wide) is finite and not all zero.
fn assert_rows_live(what: &str, values: &[f32], cols: usize, rows: &[usize]) {
    for (i, row) in values.chunks(cols).enumerate() {
        assert!(
            row.iter().all(|v| v.is_finite()),
            "{what}: row {} has a non-finite value",
            rows[i]
        );
        assert!(
            row.iter().any(|&v| v != 0.0),
            "{what}: row {} is all zero",
            rows[i]
        );
    }
}

/// The reference forward (and, given `dy`, backward) of the sub-problem made of `tokens`: the
/// same x rows and expert ids, scattered input and output. Returns `(out [S·k, N] in slot
/// order, dx [S, K])`.
#[allow(clippy::too_many_arguments)]
fn reference_for_tokens(
    c: &Case,
    x: &[f32],
    ids: &[i64],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    tokens: &[usize],
    dy: Option<&[f32]>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (k, top_k) = (c.k, c.top_k);
    let x_sub: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| x[t * k..(t + 1) * k].iter().copied())
        .collect();
    let ids_sub: Vec<i64> = tokens
        .iter()
        .flat_map(|&t| ids[t * top_k..(t + 1) * top_k].iter().copied())
        .collect();
    let routing = reference::flatten_sort_count(&ids_sub, tokens.len(), top_k, c.e).unwrap();
    let p = LinearProblem {
        x: &x_sub,
        x_rows: tokens.len(),
        w,
        num_experts: c.e,
        n: c.n,
        k,
        lora_a: a,
        lora_b: b,
        rank: c.r,
        scaling: s,
        fan_out: top_k,
        input_order: RowOrder::Scattered,
        output_order: RowOrder::Scattered,
        gates: None,
        bias: None,
    };
    let out = reference::linear_forward(&p, &routing, Rounding::Bf16)
        .unwrap()
        .out;
    let dx = dy.map(|dy| {
        reference::linear_backward(&p, &routing, dy, Rounding::Bf16)
            .unwrap()
            .dx
    });
    (out, dx)
}

/// Output rows `t·k .. t·k + k` of each token, in order.
fn slot_rows(tokens: &[usize], top_k: usize) -> Vec<usize> {
    tokens
        .iter()
        .flat_map(|&t| t * top_k..(t + 1) * top_k)
        .collect()
}

#[test]
fn outputs_past_2_pow_31_elements_match_the_reference_on_sampled_rows() {
    let Some(gpu) = gpu() else { return };
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let c = Case::new(16, 32, 8448, 32768, 8, 8, 0x1A26E);
    let l = c.t * c.top_k;
    assert!(l * c.n > 1 << 31, "the output must pass 2^31 elements");
    // Token 31775's first slot row (254200) holds element 2^31; later rows lie wholly past it.
    let boundary_row = (1usize << 31) / c.n;
    assert_eq!(boundary_row / c.top_k, 31775);
    let tokens = [0, 12345, 31774, 31775, 31776, 32700, 32766, 32767];

    let d = draw(&c);
    let routing = DeviceRouting::from_host_ids(gpu, &d.ids, c.t, c.top_k, c.e).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &d.x, c.t, c.k).unwrap();
    let lora = upload_lora(gpu, &c, &d);
    let dense = DenseExperts::from_f32(gpu, &d.w, c.e, c.n, c.k).unwrap();
    let mx_host = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    let deq = dequantize_f32(&mx_host);
    let mx = MxExperts::upload(gpu, &mx_host).unwrap();

    // The routing of 262144 slots matches the CPU's stable sort.
    let host_routing = routing.to_host(gpu).unwrap();
    let cpu_routing = reference::flatten_sort_count(&d.ids, c.t, c.top_k, c.e).unwrap();
    assert!(
        host_routing == cpu_routing,
        "GPU routing differs from the CPU's at L = {l}"
    );

    let rows = slot_rows(&tokens, c.top_k);
    for (name, weights, w_ref) in [
        ("bf16", ExpertWeights::Bf16(&dense), &d.w),
        ("MXFP4 fused", ExpertWeights::Mxfp4(&mx), &deq),
    ] {
        let start = std::time::Instant::now();
        let layer = ExpertLinear::new(
            weights,
            Some(&lora),
            RowOrder::Scattered,
            RowOrder::Scattered,
        )
        .with_strategy(Strategy::Fused);
        let (fwd, saved) = layer.forward(gpu, &x, &routing, None).unwrap();
        assert_eq!((fwd.out.rows(), fwd.out.cols()), (l, c.n));
        let got = download_rows(gpu, &fwd.out, &rows);
        assert_rows_live(&format!("{name} out"), &got, c.n, &rows);
        // dX with dy = out: the reference backward takes the GPU's (bf16) rows of these slots.
        let grads = backward(gpu, &saved, &fwd.out).unwrap();
        let dx_all = grads.dx.to_f32(gpu).unwrap();
        let dx: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| dx_all[t * c.k..(t + 1) * c.k].iter().copied())
            .collect();
        let (da, db) = (
            grads.da.unwrap().to_f32(gpu).unwrap(),
            grads.db.unwrap().to_f32(gpu).unwrap(),
        );
        println!(
            "{name}: forward and backward over {l} rows × {} columns in {:.2} s",
            c.n,
            start.elapsed().as_secs_f64()
        );
        let (expect, expect_dx) = reference_for_tokens(
            &c,
            &d.x,
            &d.ids,
            w_ref,
            &d.a,
            &d.b,
            d.s,
            &tokens,
            Some(&got),
        );
        assert_close(
            &format!("{name} out, sampled rows"),
            &got,
            &expect,
            atol(&expect),
            RTOL,
        );
        let expect_dx = expect_dx.unwrap();
        assert_close(
            &format!("{name} dx, sampled tokens"),
            &dx,
            &expect_dx,
            atol(&expect_dx),
            RTOL,
        );
        assert!(
            dx_all.iter().all(|v| v.is_finite()),
            "{name}: dx has a non-finite value"
        );
        // dA and dB reduce over all L rows (too much for the CPU reference): finite and non-zero.
        for (what, v) in [("dA", &da), ("dB", &db)] {
            assert!(
                v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0),
                "{name} {what}: non-finite or all zero"
            );
        }
    }

    // Grouped output (bf16): grouped rows straddling and past 2^31 elements, and the last ones.
    let layer = ExpertLinear::new(
        ExpertWeights::Bf16(&dense),
        Some(&lora),
        RowOrder::Scattered,
        RowOrder::Grouped,
    );
    let (fwd, _saved) = layer.forward(gpu, &x, &routing, None).unwrap();
    let grouped_rows: Vec<usize> = [0, boundary_row - 1, boundary_row, boundary_row + 1]
        .into_iter()
        .chain(l - 60..l)
        .collect();
    let got = download_rows(gpu, &fwd.out, &grouped_rows);
    assert_rows_live("bf16 grouped out", &got, c.n, &grouped_rows);
    let mut row_tokens: Vec<usize> = grouped_rows
        .iter()
        .map(|&p| cpu_routing.sorted_scattered_idxs[p] as usize / c.top_k)
        .collect();
    row_tokens.sort_unstable();
    row_tokens.dedup();
    let (by_slot, _) =
        reference_for_tokens(&c, &d.x, &d.ids, &d.w, &d.a, &d.b, d.s, &row_tokens, None);
    let expect: Vec<f32> = grouped_rows
        .iter()
        .flat_map(|&p| {
            let slot = cpu_routing.sorted_scattered_idxs[p] as usize;
            let i = row_tokens.binary_search(&(slot / c.top_k)).unwrap() * c.top_k + slot % c.top_k;
            by_slot[i * c.n..(i + 1) * c.n].iter().copied()
        })
        .collect();
    assert_close(
        "bf16 grouped out, sampled rows",
        &got,
        &expect,
        atol(&expect),
        RTOL,
    );
}

/// `len` random bytes, filled on all cores.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let parts = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(parts).next_multiple_of(8);
    std::thread::scope(|s| {
        for (i, part) in v.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for word in part.chunks_mut(8) {
                    let bytes = rng.next_u64().to_le_bytes();
                    word.copy_from_slice(&bytes[..word.len()]);
                }
            });
        }
    });
    v
}

/// The first index where `a` and `b` differ, with both values.
fn first_mismatch<T: PartialEq + Copy + std::fmt::Debug>(
    a: &[T],
    b: &[T],
) -> Option<(usize, T, T)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|i| (i, a[i], b[i]))
}

#[test]
fn expert_stack_past_2_pow_31_elements_matches_the_reference_for_the_highest_experts() {
    let Some(gpu) = gpu() else { return };
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const E: usize = 512;
    const N: usize = 5120;
    const K: usize = 2048;
    const T: usize = 32;
    const TOP_K: usize = 2;
    const R: usize = 8;
    const FIRST_USED: usize = 500;
    const {
        assert!(E * N * K / 2 > 1 << 31, "packed bytes must pass 2^31");
        assert!(
            FIRST_USED * N * K > 1 << 32,
            "the used experts' bf16 offsets must pass 2^32 elements"
        );
    }
    let start = std::time::Instant::now();

    // Random codes (every byte value) and scales 2^-9 .. 2^-3, straight into the container.
    let packed = random_bytes(E * N * K / 2, 0xB16);
    let mut rng = Rng::new(0xB17);
    let scales: Vec<u8> = (0..E * N * K / 32)
        .map(|_| 118 + rng.below(7) as u8)
        .collect();
    let mx = MxWeights::new(packed, &[E, N, K / 2], scales, &[E, N, K / 32]).unwrap();

    // Tokens on experts 500..512 only (token 0 on the very last one).
    let mut ids = Vec::with_capacity(T * TOP_K);
    for t in 0..T {
        let first = if t == 0 {
            E - 1
        } else {
            FIRST_USED + rng.below((E - FIRST_USED) as u64) as usize
        };
        let mut second = first;
        while second == first {
            second = FIRST_USED + rng.below((E - FIRST_USED) as u64) as usize;
        }
        ids.extend([first as i64, second as i64]);
    }
    let x = rng.normal_bf16(T * K, 1.0);
    let a = rng.normal_bf16(E * R * K, 0.01);
    let b = rng.normal_bf16(N * E * R, 0.01);
    let gates: Vec<f32> = (0..T * TOP_K)
        .map(|_| mxmoe::shared::bf16::round_bf16(0.25 + 0.5 * rng.uniform()))
        .collect();
    let dy = rng.normal_bf16(T * N, 1.0);
    let s = 0.5;
    println!("host data drawn in {:.1} s", start.elapsed().as_secs_f64());

    // Device: the container through the device-facing constructor, and a bf16 copy of every
    // expert dequantized on the device (5.4e9 elements).
    let packed_dev = upload(gpu, mx.packed()).unwrap();
    let scales_dev = upload(gpu, mx.scales()).unwrap();
    let all: Vec<u32> = (0..E as u32).collect();
    let dense_dev = dequant_mxfp4_bf16(gpu, &packed_dev, &scales_dev, E, N, K, &all).unwrap();
    let last = gpu
        .stream()
        .clone_dtoh(&dense_dev.slice((E - 1) * N * K..E * N * K))
        .unwrap();
    if let Some((i, got, want)) =
        first_mismatch(&last, &dequantize_experts_bf16(&mx, &[E - 1]).unwrap())
    {
        panic!(
            "device dequant of expert {} differs at element {i}: {got:#06x} vs CPU {want:#06x}",
            E - 1
        );
    }
    let dense = DenseExperts::from_device(dense_dev, E, N, K).unwrap();
    let meta = |dtype, shape: [usize; 3]| TensorMeta::contiguous(dtype, shape, DeviceLoc::Cuda(0));
    let mx_dev = MxExperts::from_device(
        packed_dev,
        &meta(DType::U8, [E, N, K / 2]),
        scales_dev,
        &meta(DType::E8M0, [E, N, K / 32]),
    )
    .unwrap();
    let routing = DeviceRouting::from_host_ids(gpu, &ids, T, TOP_K, E).unwrap();
    let x_dev = Bf16Matrix::from_f32(gpu, &x, T, K).unwrap();
    let lora = LoraWeights {
        a: Bf16Matrix::from_f32(gpu, &a, E * R, K).unwrap(),
        b: Bf16Matrix::from_f32(gpu, &b, N, E * R).unwrap(),
        rank: R,
        scaling: s,
    };
    let gates_dev = Bf16Matrix::from_f32(gpu, &gates, T, TOP_K).unwrap();
    let dy_dev = Bf16Matrix::from_f32(gpu, &dy, T, N).unwrap();
    println!(
        "device data ready after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let run = |weights: ExpertWeights<'_>, strategy: Strategy| -> Run {
        let layer = ExpertLinear::new(
            weights,
            Some(&lora),
            RowOrder::Scattered,
            RowOrder::Scattered,
        )
        .with_strategy(strategy);
        let (fwd, saved) = layer
            .forward(gpu, &x_dev, &routing, Some(&gates_dev))
            .unwrap();
        let g = backward(gpu, &saved, &dy_dev).unwrap();
        let f = |m: &Bf16Matrix| m.to_f32(gpu).unwrap();
        (
            f(&fwd.out),
            f(&g.dx),
            f(g.da.as_ref().unwrap()),
            f(g.db.as_ref().unwrap()),
            f(g.d_gates.as_ref().unwrap()),
        )
    };
    let runs = [
        (
            "MXFP4 fused",
            run(ExpertWeights::Mxfp4(&mx_dev), Strategy::Fused),
        ),
        (
            "MXFP4 selective",
            run(ExpertWeights::Mxfp4(&mx_dev), Strategy::SelectiveDequant),
        ),
        ("bf16", run(ExpertWeights::Bf16(&dense), Strategy::Fused)),
    ];
    println!(
        "three forward+backward runs done after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // The reference on the used experts only, ids remapped to 0..used.len().
    let mut used: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    used.sort_unstable();
    used.dedup();
    let remap = |e: usize| used.binary_search(&e).unwrap();
    let ids_sub: Vec<i64> = ids.iter().map(|&i| remap(i as usize) as i64).collect();
    let w_sub = dequantize_experts_f32(&mx, &used).unwrap();
    let a_sub: Vec<f32> = used
        .iter()
        .flat_map(|&e| a[e * R * K..(e + 1) * R * K].iter().copied())
        .collect();
    let b_sub: Vec<f32> = (0..N)
        .flat_map(|n| {
            used.iter()
                .flat_map(move |&e| (0..R).map(move |j| n * E * R + e * R + j))
        })
        .map(|i| b[i])
        .collect();
    let e_sub = used.len();
    let routing_sub = reference::flatten_sort_count(&ids_sub, T, TOP_K, e_sub).unwrap();
    let p = LinearProblem {
        x: &x,
        x_rows: T,
        w: &w_sub,
        num_experts: e_sub,
        n: N,
        k: K,
        lora_a: &a_sub,
        lora_b: &b_sub,
        rank: R,
        scaling: s,
        fan_out: TOP_K,
        input_order: RowOrder::Scattered,
        output_order: RowOrder::Scattered,
        gates: Some(&gates),
        bias: None,
    };
    let fwd = reference::linear_forward(&p, &routing_sub, Rounding::Bf16).unwrap();
    let grads = reference::linear_backward(&p, &routing_sub, &dy, Rounding::Bf16).unwrap();
    println!(
        "reference on {e_sub} experts done after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let y_ref = fwd.y.unwrap();
    let dg_ref = grads.d_gates.unwrap();

    for (name, (y, dx, da, db, dg)) in &runs {
        assert_close(&format!("{name} y"), y, &y_ref, atol(&y_ref), RTOL);
        assert_close(&format!("{name} dx"), dx, &grads.dx, atol(&grads.dx), RTOL);
        assert_close(&format!("{name} d_gates"), dg, &dg_ref, atol(&dg_ref), RTOL);
        // dA rows and dB columns of the used experts match; every other expert's are zero.
        let da_used: Vec<f32> = used
            .iter()
            .flat_map(|&e| da[e * R * K..(e + 1) * R * K].iter().copied())
            .collect();
        assert_close(
            &format!("{name} dA (used experts)"),
            &da_used,
            &grads.da,
            atol(&grads.da),
            RTOL,
        );
        let db_used: Vec<f32> = (0..N)
            .flat_map(|n| {
                used.iter()
                    .flat_map(move |&e| (0..R).map(move |j| n * E * R + e * R + j))
            })
            .map(|i| db[i])
            .collect();
        assert_close(
            &format!("{name} dB (used experts)"),
            &db_used,
            &grads.db,
            atol(&grads.db),
            RTOL,
        );
        for e in (0..E).filter(|e| used.binary_search(e).is_err()) {
            assert!(
                da[e * R * K..(e + 1) * R * K].iter().all(|&v| v == 0.0),
                "{name}: unused expert {e} has a nonzero dA"
            );
            assert!(
                (0..N).all(|n| db[n * E * R + e * R..n * E * R + (e + 1) * R]
                    .iter()
                    .all(|&v| v == 0.0)),
                "{name}: unused expert {e} has a nonzero dB"
            );
        }
    }
    // Both MXFP4 strategies are bitwise equal to the bf16 path on the dequantized weights.
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (_, dense_run) = &runs[2];
    for (name, r) in &runs[..2] {
        for (what, got, want) in [
            ("y", &r.0, &dense_run.0),
            ("dx", &r.1, &dense_run.1),
            ("dA", &r.2, &dense_run.2),
            ("dB", &r.3, &dense_run.3),
            ("d_gates", &r.4, &dense_run.4),
        ] {
            if let Some((i, g, w)) = first_mismatch(&bits(got), &bits(want)) {
                panic!(
                    "{name} {what} differs from the bf16 path at element {i}: {:e} vs {:e}",
                    f32::from_bits(g),
                    f32::from_bits(w)
                );
            }
        }
    }
    println!("done after {:.1} s", start.elapsed().as_secs_f64());
}
