//! The bad-input catalog: every validation rule of the device-facing API returns its specific
//! typed error (`mxmoe::Error` / `MxError` variant and the tensor or argument it names), the
//! stream stays healthy after each (a kernel launched on bad input could fault and poison the
//! context), and a valid call afterwards still succeeds and matches the reference.
//!
//! Covered: the expert linear's forward (x columns and rows per input order, LoRA shapes and rank,
//! non-finite scaling, gates, experts of weights vs routing, K and N multiples of 8) for bf16 and
//! every MXFP4 strategy; backward's dy shape; routing (host and device ids out of range, −2, id
//! count, top-k 0, zero or too many experts); the MXFP4 container through
//! `MxExperts::from_device` (every `validate_mx` rule a `TensorMeta` can express) and the two it
//! cannot (block size, swizzled scales) through `validate_mx`; too-short device buffers; the
//! dequant kernel wrapper.
//!
//! Also here: NaN inputs are data, not errors — a NaN in `x` reaches exactly the output rows that
//! read that row of `x` and leaves every other row bit for bit unchanged.

use mxmoe::Error;
use mxmoe::Runtime;
use mxmoe::device::upload;
use mxmoe::kernels::dequant::dequant_mxfp4_bf16;
use mxmoe::mxfp4::{MxError, MxLayout, MxWeights, dequantize_bf16, quantize_mxfp4, validate_mx};
use mxmoe::op::{
    Bf16Matrix, DenseExperts, ExpertLinear, ExpertWeights, LoraWeights, MxExperts, RowOrder,
    Strategy, backward,
};
use mxmoe::routing::DeviceIds;
use mxmoe::routing::DeviceRouting;
use mxmoe::shared::params::MAX_EXPERTS;
use mxmoe::shared::tiles::MAX_RANK;
use mxmoe::tensor::{DType, DeviceLoc, TensorMeta};
use mxmoe_tests::linear_case::{
    Base, Case, Data, compare, draw, out_rows, run_gpu_with, upload_lora,
};
use mxmoe_tests::{Rng, gpu};

/// Experts, output dim, reduction dim, tokens, top-k and LoRA rank of the catalog's fixture.
const E: usize = 4;
const N: usize = 16;
const K: usize = 64;
const T: usize = 6;
const TOP_K: usize = 2;
const L: usize = T * TOP_K;
const R: usize = 4;

/// Counts the bad inputs checked; each must give the expected error and leave the stream usable.
struct Catalog<'g> {
    gpu: &'g Runtime,
    checked: usize,
}

impl Catalog<'_> {
    /// Asserts that `result` is an error accepted by `expected`, then that the stream is healthy.
    fn expect<T>(
        &mut self,
        what: &str,
        result: mxmoe::Result<T>,
        expected: impl FnOnce(&Error) -> bool,
    ) {
        match result {
            Ok(_) => panic!("{what}: accepted; expected a typed error"),
            Err(e) => assert!(expected(&e), "{what}: unexpected error {e:?}"),
        }
        self.gpu
            .synchronize()
            .unwrap_or_else(|e| panic!("{what}: the stream failed after the error: {e}"));
        self.checked += 1;
    }

    /// As [`expect`](Self::expect) for the MXFP4 container's own error type.
    fn expect_mx<T>(
        &mut self,
        what: &str,
        result: Result<T, MxError>,
        expected: impl FnOnce(&MxError) -> bool,
    ) {
        self.expect(
            what,
            result.map_err(Error::from),
            |e| matches!(e, Error::Mx(m) if expected(m)),
        );
    }
}

/// A matrix of `rows × cols` small values.
fn matrix(gpu: &Runtime, rows: usize, cols: usize) -> Bf16Matrix {
    Bf16Matrix::from_f32(
        gpu,
        &Rng::new((rows * 131 + cols) as u64).normal_bf16(rows * cols, 0.1),
        rows,
        cols,
    )
    .unwrap()
}

/// LoRA factors with the given shapes, rank and scaling.
fn lora(
    gpu: &Runtime,
    a: (usize, usize),
    b: (usize, usize),
    rank: usize,
    scaling: f32,
) -> LoraWeights {
    LoraWeights {
        a: matrix(gpu, a.0, a.1),
        b: matrix(gpu, b.0, b.1),
        rank,
        scaling,
    }
}

/// Valid ids `[T, TOP_K]` over `experts` experts (distinct per token).
fn valid_ids(experts: usize) -> Vec<i64> {
    (0..T)
        .flat_map(|t| (0..TOP_K).map(move |j| ((t + j) % experts) as i64))
        .collect()
}

/// Every rule of `ExpertLinear::validate` and backward's dy check, for one kind of weights.
fn forward_and_backward_rules(
    cat: &mut Catalog<'_>,
    weights: ExpertWeights<'_>,
    strategy: Strategy,
    tag: &str,
) {
    let gpu = cat.gpu;
    let routing = DeviceRouting::from_host_ids(gpu, &valid_ids(E), T, TOP_K, E).unwrap();
    let routing_5 = DeviceRouting::from_host_ids(gpu, &valid_ids(E), T, TOP_K, E + 1).unwrap();
    let routing_3 = DeviceRouting::from_host_ids(gpu, &valid_ids(E - 1), T, TOP_K, E - 1).unwrap();
    let x = matrix(gpu, T, K);
    let x_slots = matrix(gpu, L, K);
    let good_lora = lora(gpu, (E * R, K), (N, E * R), R, 0.5);
    let gates = matrix(gpu, T, TOP_K);
    let layer = |lora, input, output| {
        ExpertLinear::new(weights, lora, input, output).with_strategy(strategy)
    };
    let scattered = layer(Some(&good_lora), RowOrder::Scattered, RowOrder::Grouped);
    let is_shape = |tensor: &'static str| move |e: &Error| matches!(e, Error::Shape { tensor: t, .. } if *t == tensor);
    let is_invalid = |what: &'static str| move |e: &Error| matches!(e, Error::InvalidArgument { what: w, .. } if *w == what);

    // Experts of the weights vs the routing, both ways.
    cat.expect(
        &format!("{tag}: routing with E + 1 experts"),
        scattered.forward(gpu, &x, &routing_5, None),
        is_shape("expert weights"),
    );
    cat.expect(
        &format!("{tag}: routing with E − 1 experts"),
        scattered.forward(gpu, &x, &routing_3, None),
        is_shape("expert weights"),
    );
    // x columns and rows.
    cat.expect(
        &format!("{tag}: x with K + 8 columns"),
        scattered.forward(gpu, &matrix(gpu, T, K + 8), &routing, None),
        is_shape("x"),
    );
    cat.expect(
        &format!("{tag}: x with K − 8 columns"),
        scattered.forward(gpu, &matrix(gpu, T, K - 8), &routing, None),
        is_shape("x"),
    );
    cat.expect(
        &format!("{tag}: token-ordered x with T + 1 rows"),
        scattered.forward(gpu, &matrix(gpu, T + 1, K), &routing, None),
        is_shape("x"),
    );
    cat.expect(
        &format!("{tag}: slot-ordered x with T·k + 1 rows"),
        scattered.forward(gpu, &matrix(gpu, L + 1, K), &routing, None),
        is_shape("x"),
    );
    let grouped_in = layer(Some(&good_lora), RowOrder::Grouped, RowOrder::Grouped);
    cat.expect(
        &format!("{tag}: grouped x with T rows (needs T·k)"),
        grouped_in.forward(gpu, &x, &routing, None),
        is_shape("x"),
    );
    cat.expect(
        &format!("{tag}: grouped x with T·k − 1 rows"),
        grouped_in.forward(gpu, &matrix(gpu, L - 1, K), &routing, None),
        is_shape("x"),
    );
    // LoRA rank, shapes and scaling.
    let bad_loras = [
        ("rank 0", lora(gpu, (0, K), (N, 0), 0, 0.5), "LoRA rank"),
        (
            "rank MAX_RANK + 1",
            lora(
                gpu,
                (E * (MAX_RANK as usize + 1), K),
                (N, E * (MAX_RANK as usize + 1)),
                MAX_RANK as usize + 1,
                0.5,
            ),
            "LoRA rank",
        ),
        (
            "lora_A with E·r − 1 rows",
            lora(gpu, (E * R - 1, K), (N, E * R), R, 0.5),
            "lora_A",
        ),
        (
            "lora_A with K + 8 columns",
            lora(gpu, (E * R, K + 8), (N, E * R), R, 0.5),
            "lora_A",
        ),
        (
            "lora_A for a larger rank",
            lora(gpu, (E * (R + 1), K), (N, E * R), R, 0.5),
            "lora_A",
        ),
        (
            "lora_B with N + 8 rows",
            lora(gpu, (E * R, K), (N + 8, E * R), R, 0.5),
            "lora_B",
        ),
        (
            "lora_B with E·r + 1 columns",
            lora(gpu, (E * R, K), (N, E * R + 1), R, 0.5),
            "lora_B",
        ),
        (
            "NaN scaling",
            lora(gpu, (E * R, K), (N, E * R), R, f32::NAN),
            "LoRA scaling",
        ),
        (
            "+Inf scaling",
            lora(gpu, (E * R, K), (N, E * R), R, f32::INFINITY),
            "LoRA scaling",
        ),
        (
            "−Inf scaling",
            lora(gpu, (E * R, K), (N, E * R), R, f32::NEG_INFINITY),
            "LoRA scaling",
        ),
    ];
    for (what, bad, name) in &bad_loras {
        let result = layer(Some(bad), RowOrder::Scattered, RowOrder::Grouped)
            .forward(gpu, &x, &routing, None);
        let expected = |e: &Error| matches!(e, Error::Shape { tensor, .. } | Error::InvalidArgument { what: tensor, .. } if tensor == name);
        cat.expect(&format!("{tag}: LoRA {what}"), result, expected);
    }
    // Gates: only with scattered output, shaped [T, k].
    cat.expect(
        &format!("{tag}: gates with grouped output"),
        scattered.forward(gpu, &x, &routing, Some(&gates)),
        is_invalid("gates"),
    );
    let gated = layer(Some(&good_lora), RowOrder::Scattered, RowOrder::Scattered);
    for (rows, cols) in [(T, TOP_K + 1), (T + 1, TOP_K), (L, 1)] {
        cat.expect(
            &format!("{tag}: gates [{rows}, {cols}]"),
            gated.forward(gpu, &x, &routing, Some(&matrix(gpu, rows, cols))),
            is_shape("gates"),
        );
    }
    // Backward: dy must be shaped like the forward output ([T·k, N], or [T, N] with gates).
    let (fwd, saved) = scattered
        .forward(gpu, &x_slots, &routing, None)
        .expect("valid forward");
    assert_eq!((fwd.out.rows(), fwd.out.cols()), (L, N));
    for (rows, cols) in [(L + 1, N), (L - 1, N), (L, N + 8), (T, N)] {
        cat.expect(
            &format!("{tag}: dy [{rows}, {cols}] for out [{L}, {N}]"),
            backward(gpu, &saved, &matrix(gpu, rows, cols)),
            is_shape("dy"),
        );
    }
    backward(gpu, &saved, &matrix(gpu, L, N)).expect("valid backward");
    let (fwd, saved) = gated
        .forward(gpu, &x, &routing, Some(&gates))
        .expect("valid gated forward");
    assert_eq!((fwd.out.rows(), fwd.out.cols()), (T, N));
    cat.expect(
        &format!("{tag}: dy [T·k, N] for gated out [T, N]"),
        backward(gpu, &saved, &matrix(gpu, L, N)),
        is_shape("dy"),
    );
    backward(gpu, &saved, &matrix(gpu, T, N)).expect("valid gated backward");
}

/// K and N must be multiples of 8 (bf16: both; MXFP4: N, as K % 32 is the container's rule).
fn dimension_rules(cat: &mut Catalog<'_>) {
    let gpu = cat.gpu;
    let routing = DeviceRouting::from_host_ids(gpu, &valid_ids(E), T, TOP_K, E).unwrap();
    let is_weights_rule = |e: &Error| {
        matches!(
            e,
            Error::InvalidArgument {
                what: "expert weights",
                ..
            }
        )
    };
    for (n, k) in [(N, 12), (12, K), (20, 36)] {
        let w = DenseExperts::from_f32(gpu, &vec![0.5; E * n * k], E, n, k).unwrap();
        let layer = ExpertLinear::new(
            ExpertWeights::Bf16(&w),
            None,
            RowOrder::Scattered,
            RowOrder::Grouped,
        );
        cat.expect(
            &format!("bf16 weights with N = {n}, K = {k}"),
            layer.forward(gpu, &matrix(gpu, T, k), &routing, None),
            is_weights_rule,
        );
    }
    let mx = MxExperts::upload(
        gpu,
        &quantize_mxfp4(&vec![0.5; E * 12 * K], E, 12, K).unwrap(),
    )
    .unwrap();
    for strategy in [Strategy::Fused, Strategy::SelectiveDequant, Strategy::Auto] {
        let layer = ExpertLinear::new(
            ExpertWeights::Mxfp4(&mx),
            None,
            RowOrder::Scattered,
            RowOrder::Grouped,
        )
        .with_strategy(strategy);
        cat.expect(
            &format!("MXFP4 weights with N = 12 ({strategy:?})"),
            layer.forward(gpu, &matrix(gpu, T, K), &routing, None),
            is_weights_rule,
        );
    }
}

/// Routing: host ids (i64 and i32), device ids, id counts, top-k, expert counts.
fn routing_rules(cat: &mut Catalog<'_>) {
    let gpu = cat.gpu;
    let bad_ids = |e: &Error| {
        matches!(
            e,
            Error::InvalidArgument {
                what: "expert ids",
                ..
            }
        )
    };
    let bad_count = |e: &Error| {
        matches!(
            e,
            Error::Shape {
                tensor: "expert ids",
                ..
            }
        )
    };
    for bad in [E as i64, E as i64 + 100, -2, i64::MIN, i64::MAX] {
        let mut ids = valid_ids(E);
        ids[L - 1] = bad;
        cat.expect(
            &format!("host i64 id {bad}"),
            DeviceRouting::from_host_ids(gpu, &ids, T, TOP_K, E),
            bad_ids,
        );
    }
    for bad in [E as i32, -2, i32::MIN, i32::MAX] {
        let mut ids: Vec<i32> = valid_ids(E).iter().map(|&i| i as i32).collect();
        ids[3] = bad;
        cat.expect(
            &format!("host i32 id {bad}"),
            DeviceRouting::from_host_ids_i32(gpu, &ids, T, TOP_K, E),
            bad_ids,
        );
    }
    let ids = valid_ids(E);
    let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    for len in [L - 1, L + 1, 0] {
        cat.expect(
            &format!("{len} host i64 ids for [T, k]"),
            DeviceRouting::from_host_ids(gpu, &vec![0; len], T, TOP_K, E),
            bad_count,
        );
        cat.expect(
            &format!("{len} host i32 ids for [T, k]"),
            DeviceRouting::from_host_ids_i32(gpu, &vec![0; len], T, TOP_K, E),
            bad_count,
        );
    }
    cat.expect(
        "top_k 0",
        DeviceRouting::from_host_ids(gpu, &[], T, 0, E),
        |e| matches!(e, Error::InvalidArgument { what: "top_k", .. }),
    );
    cat.expect(
        "top_k 0 (i32)",
        DeviceRouting::from_host_ids_i32(gpu, &[], T, 0, E),
        |e| matches!(e, Error::InvalidArgument { what: "top_k", .. }),
    );
    cat.expect(
        "0 experts",
        DeviceRouting::from_host_ids(gpu, &[-1; L], T, TOP_K, 0),
        |e| {
            matches!(
                e,
                Error::InvalidArgument {
                    what: "num_experts",
                    ..
                }
            )
        },
    );
    let too_many = MAX_EXPERTS as usize + 1;
    cat.expect(
        &format!("{too_many} experts (MAX_EXPERTS + 1)"),
        DeviceRouting::from_host_ids(gpu, &ids, T, TOP_K, too_many),
        |e| {
            matches!(
                e,
                Error::InvalidArgument {
                    what: "num_experts",
                    ..
                }
            )
        },
    );

    // Device ids: the count and top-k are checked on the host; ids outside [-1, E) are found by
    // the routing kernels, act as dropped, and are reported by `check`.
    let dev = upload(gpu, &ids).unwrap();
    let dev32 = upload(gpu, &ids32).unwrap();
    cat.expect(
        "device i64 ids: count T·k for [T + 1, k]",
        DeviceRouting::from_device_ids(gpu, DeviceIds::I64(&dev), T + 1, TOP_K, E),
        bad_count,
    );
    cat.expect(
        "device i32 ids: count T·k for [T, k − 1]",
        DeviceRouting::from_device_ids(gpu, DeviceIds::I32(&dev32), T, TOP_K - 1, E),
        bad_count,
    );
    cat.expect(
        "device ids: top_k 0",
        DeviceRouting::from_device_ids(gpu, DeviceIds::I64(&dev), T, 0, E),
        |e| matches!(e, Error::InvalidArgument { what: "top_k", .. }),
    );
    cat.expect(
        "device ids: 0 experts",
        DeviceRouting::from_device_ids(gpu, DeviceIds::I64(&dev), T, TOP_K, 0),
        |e| {
            matches!(
                e,
                Error::InvalidArgument {
                    what: "num_experts",
                    ..
                }
            )
        },
    );
    DeviceRouting::from_device_ids(gpu, DeviceIds::I64(&dev), T, TOP_K, E)
        .unwrap()
        .check(gpu)
        .expect("valid device ids pass the check");
    for bad in [E as i64, -2, i64::MAX] {
        let mut bad_ids_host = ids.clone();
        bad_ids_host[5] = bad;
        let routing = DeviceRouting::from_device_ids(
            gpu,
            DeviceIds::I64(&upload(gpu, &bad_ids_host).unwrap()),
            T,
            TOP_K,
            E,
        )
        .unwrap();
        cat.expect(
            &format!("device i64 id {bad}, reported by check"),
            routing.check(gpu),
            bad_ids,
        );
    }
    for bad in [E as i32, -2] {
        let mut bad_ids_host = ids32.clone();
        bad_ids_host[0] = bad;
        let routing = DeviceRouting::from_device_ids(
            gpu,
            DeviceIds::I32(&upload(gpu, &bad_ids_host).unwrap()),
            T,
            TOP_K,
            E,
        )
        .unwrap();
        cat.expect(
            &format!("device i32 id {bad}, reported by check"),
            routing.check(gpu),
            bad_ids,
        );
    }
}

/// An out-of-range device id routes its slot like a dropped one: zero output row, no effect on
/// the other rows (bitwise equal to the same routing with −1 in that slot).
fn bad_device_id_acts_as_dropped(gpu: &Runtime) {
    let c = Case::new(E, K, N, T, TOP_K, R, 0xBAD1D);
    let d = draw(&c);
    let w = DenseExperts::from_f32(gpu, &d.w, E, N, K).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &d.x, T, K).unwrap();
    let lw = upload_lora(gpu, &c, &d);
    let layer = ExpertLinear::new(
        ExpertWeights::Bf16(&w),
        Some(&lw),
        RowOrder::Scattered,
        RowOrder::Scattered,
    );
    let out_for = |bad: i64| {
        let mut ids = d.ids.clone();
        ids[5] = bad;
        let routing = DeviceRouting::from_device_ids(
            gpu,
            DeviceIds::I64(&upload(gpu, &ids).unwrap()),
            T,
            TOP_K,
            E,
        )
        .unwrap();
        layer
            .forward(gpu, &x, &routing, None)
            .unwrap()
            .0
            .out
            .to_f32(gpu)
            .unwrap()
    };
    let dropped = out_for(-1);
    let out_of_range = out_for(E as i64 + 7);
    assert!(
        out_of_range[5 * N..6 * N].iter().all(|&v| v == 0.0),
        "an out-of-range device id must give a zero row"
    );
    assert!(
        dropped
            .iter()
            .zip(&out_of_range)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "an out-of-range id must act exactly as a dropped slot"
    );
}

/// The MXFP4 container through `MxExperts::from_device`: every `validate_mx` rule a `TensorMeta`
/// can express, then the buffer lengths; block size and swizzling through `validate_mx`.
fn container_rules(cat: &mut Catalog<'_>) {
    let gpu = cat.gpu;
    let host = quantize_mxfp4(&Rng::new(0xC0).normal_bf16(E * N * K, 1.0), E, N, K).unwrap();
    let (p_shape, s_shape) = ([E, N, K / 2], [E, N, K / 32]);
    let meta = |dtype, shape: &[usize]| TensorMeta::contiguous(dtype, shape, DeviceLoc::Cuda(0));
    let (good_p, good_s) = (meta(DType::U8, &p_shape), meta(DType::E8M0, &s_shape));
    let from = |p: &TensorMeta, s: &TensorMeta| {
        MxExperts::from_device(
            upload(gpu, host.packed()).unwrap(),
            p,
            upload(gpu, host.scales()).unwrap(),
            s,
        )
    };
    from(&good_p, &good_s).expect("valid metadata (scales as e8m0)");
    from(&good_p, &meta(DType::U8, &s_shape)).expect("valid metadata (scales as u8)");

    let mx = |check: fn(&MxError) -> bool| move |e: &Error| matches!(e, Error::Mx(m) if check(m));
    // Element types.
    for dtype in [DType::BF16, DType::E8M0, DType::I32, DType::F32] {
        cat.expect(
            &format!("packed as {dtype}"),
            from(&meta(dtype, &p_shape), &good_s),
            mx(|m| {
                matches!(
                    m,
                    MxError::DType {
                        tensor: "packed",
                        ..
                    }
                )
            }),
        );
    }
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::I64] {
        cat.expect(
            &format!("scales as {dtype}"),
            from(&good_p, &meta(dtype, &s_shape)),
            mx(|m| {
                matches!(
                    m,
                    MxError::DType {
                        tensor: "scales",
                        ..
                    }
                )
            }),
        );
    }
    // Ranks.
    cat.expect(
        "packed of rank 2",
        from(&meta(DType::U8, &[E * N, K / 2]), &good_s),
        mx(|m| {
            matches!(
                m,
                MxError::Rank {
                    tensor: "packed",
                    actual: 2,
                    ..
                }
            )
        }),
    );
    cat.expect(
        "packed of rank 4",
        from(&meta(DType::U8, &[1, E, N, K / 2]), &good_s),
        mx(|m| {
            matches!(
                m,
                MxError::Rank {
                    tensor: "packed",
                    actual: 4,
                    ..
                }
            )
        }),
    );
    cat.expect(
        "scales of rank 2",
        from(&good_p, &meta(DType::E8M0, &[E * N, K / 32])),
        mx(|m| {
            matches!(
                m,
                MxError::Rank {
                    tensor: "scales",
                    actual: 2,
                    ..
                }
            )
        }),
    );
    // K > 0, N > 0, K % 32 == 0.
    for (what, p, s) in [
        ("K = 16", [E, N, 8], [E, N, 0]),
        ("K = 48", [E, N, 24], [E, N, 1]),
        ("K = 0", [E, N, 0], [E, N, 0]),
        ("N = 0", [E, 0, K / 2], [E, 0, K / 32]),
    ] {
        cat.expect(
            what,
            from(&meta(DType::U8, &p), &meta(DType::E8M0, &s)),
            mx(|m| matches!(m, MxError::Divisibility { .. })),
        );
    }
    // E ≥ 1, then scales [E, N, K/32].
    cat.expect(
        "E = 0",
        from(
            &meta(DType::U8, &[0, N, K / 2]),
            &meta(DType::E8M0, &[0, N, K / 32]),
        ),
        mx(|m| {
            matches!(
                m,
                MxError::Shape {
                    tensor: "packed",
                    ..
                }
            )
        }),
    );
    for s in [
        [E, N, K / 32 + 1],
        [E + 1, N, K / 32],
        [E, N - 1, K / 32],
        [E - 1, N, K / 32],
    ] {
        cat.expect(
            &format!("scales {s:?} for packed {p_shape:?}"),
            from(&good_p, &meta(DType::E8M0, &s)),
            mx(|m| {
                matches!(
                    m,
                    MxError::Shape {
                        tensor: "scales",
                        ..
                    }
                )
            }),
        );
    }
    // Element counts beyond usize.
    cat.expect(
        "packed with E·N·K overflowing usize",
        from(
            &meta(DType::U8, &[usize::MAX / 4, 8, 16]),
            &meta(DType::E8M0, &[usize::MAX / 4, 8, 1]),
        ),
        mx(|m| matches!(m, MxError::Overflow { .. })),
    );
    cat.expect(
        "packed with 2·(K/2) overflowing usize",
        from(&meta(DType::U8, &[1, 1, usize::MAX]), &good_s),
        mx(|m| {
            matches!(
                m,
                MxError::Overflow {
                    tensor: "packed",
                    ..
                }
            )
        }),
    );
    // Same device.
    for (pd, sd) in [
        (DeviceLoc::Cuda(0), DeviceLoc::Cuda(1)),
        (DeviceLoc::Cuda(0), DeviceLoc::Cpu),
        (DeviceLoc::Cpu, DeviceLoc::Cuda(0)),
    ] {
        let p = TensorMeta::contiguous(DType::U8, p_shape, pd);
        let s = TensorMeta::contiguous(DType::E8M0, s_shape, sd);
        cat.expect(
            &format!("packed on {pd}, scales on {sd}"),
            from(&p, &s),
            mx(|m| matches!(m, MxError::Device { .. })),
        );
    }
    // K contiguous (innermost stride 1), one stride per dimension.
    let mut p = good_p.clone();
    p.strides[2] = 2;
    cat.expect(
        "packed with innermost stride 2",
        from(&p, &good_s),
        mx(|m| matches!(m, MxError::Layout(_))),
    );
    let mut s = good_s.clone();
    s.strides = vec![1, E, E * N];
    cat.expect(
        "scales transposed (innermost stride E·N)",
        from(&good_p, &s),
        mx(|m| matches!(m, MxError::Layout(_))),
    );
    let mut p = good_p.clone();
    p.strides.pop();
    cat.expect(
        "packed with 2 strides for rank 3",
        from(&p, &good_s),
        mx(|m| matches!(m, MxError::Layout(_))),
    );
    let mut s = good_s.clone();
    s.strides.push(1);
    cat.expect(
        "scales with 4 strides for rank 3",
        from(&good_p, &s),
        mx(|m| matches!(m, MxError::Layout(_))),
    );
    // The kernels read the buffers densely: a padded outer stride is rejected, not misread.
    let mut p = good_p.clone();
    p.strides[0] *= 2;
    cat.expect(
        "packed with a padded expert stride",
        from(&p, &good_s),
        mx(|m| matches!(m, MxError::Layout(_))),
    );
    // Buffers shorter than the declared shapes.
    let short = |bytes: &[u8], cut: usize| upload(gpu, &bytes[..bytes.len() - cut]).unwrap();
    let too_short = |e: &Error| {
        matches!(
            e,
            Error::Shape {
                tensor: "MXFP4 buffers",
                ..
            }
        )
    };
    cat.expect(
        "packed one byte short",
        MxExperts::from_device(
            short(host.packed(), 1),
            &good_p,
            upload(gpu, host.scales()).unwrap(),
            &good_s,
        ),
        too_short,
    );
    cat.expect(
        "packed one expert short",
        MxExperts::from_device(
            short(host.packed(), N * K / 2),
            &good_p,
            upload(gpu, host.scales()).unwrap(),
            &good_s,
        ),
        too_short,
    );
    cat.expect(
        "scales one byte short",
        MxExperts::from_device(
            upload(gpu, host.packed()).unwrap(),
            &good_p,
            short(host.scales(), 1),
            &good_s,
        ),
        too_short,
    );
    // Not expressible through `from_device` (it declares block 32, `Fwd`, plain scales).
    cat.expect_mx(
        "block size 16",
        validate_mx(&good_p, &good_s, 16, MxLayout::Fwd, false),
        |m| matches!(m, MxError::UnsupportedBlockSize(16)),
    );
    cat.expect_mx(
        "block size 64",
        validate_mx(&good_p, &good_s, 64, MxLayout::Fwd, false),
        |m| matches!(m, MxError::UnsupportedBlockSize(64)),
    );
    cat.expect_mx(
        "swizzled scales",
        validate_mx(&good_p, &good_s, 32, MxLayout::Fwd, true),
        |m| matches!(m, MxError::Layout(_)),
    );
    // Host container lengths.
    let (packed, scales) = (host.packed().to_vec(), host.scales().to_vec());
    cat.expect_mx(
        "host packed one byte short",
        MxWeights::new(packed[1..].to_vec(), &p_shape, scales.clone(), &s_shape),
        |m| {
            matches!(
                m,
                MxError::Length {
                    tensor: "packed",
                    ..
                }
            )
        },
    );
    cat.expect_mx(
        "host scales one byte long",
        MxWeights::new(packed, &p_shape, [scales, vec![127]].concat(), &s_shape),
        |m| {
            matches!(
                m,
                MxError::Length {
                    tensor: "scales",
                    ..
                }
            )
        },
    );
}

/// Device buffers shorter than the declared shape, and host uploads of the wrong length.
fn buffer_rules(cat: &mut Catalog<'_>) {
    let gpu = cat.gpu;
    let matrix_err = |e: &Error| {
        matches!(
            e,
            Error::Shape {
                tensor: "matrix",
                ..
            }
        )
    };
    let weights_err = |e: &Error| {
        matches!(
            e,
            Error::Shape {
                tensor: "expert weights",
                ..
            }
        )
    };
    cat.expect(
        "Bf16Matrix::from_device with 15 of 16 elements",
        Bf16Matrix::from_device(upload(gpu, &[0u16; 15]).unwrap(), 4, 4),
        matrix_err,
    );
    cat.expect(
        "Bf16Matrix::from_device with 1 element for [8, 64]",
        Bf16Matrix::from_device(upload(gpu, &[0u16; 1]).unwrap(), 8, 64),
        matrix_err,
    );
    cat.expect(
        "Bf16Matrix::from_bits with 17 bits for [4, 4]",
        Bf16Matrix::from_bits(gpu, &[0u16; 17], 4, 4),
        matrix_err,
    );
    cat.expect(
        "Bf16Matrix::from_f32 with 15 values for [4, 4]",
        Bf16Matrix::from_f32(gpu, &[0.0; 15], 4, 4),
        matrix_err,
    );
    cat.expect(
        "DenseExperts::from_device one element short",
        DenseExperts::from_device(upload(gpu, &vec![0u16; E * N * K - 1]).unwrap(), E, N, K),
        weights_err,
    );
    cat.expect(
        "DenseExperts::from_device one expert short",
        DenseExperts::from_device(upload(gpu, &vec![0u16; (E - 1) * N * K]).unwrap(), E, N, K),
        weights_err,
    );
    cat.expect(
        "DenseExperts::from_bits one element long",
        DenseExperts::from_bits(gpu, &vec![0u16; E * N * K + 1], E, N, K),
        weights_err,
    );
    cat.expect(
        "DenseExperts::from_f32 one element short",
        DenseExperts::from_f32(gpu, &vec![0.0; E * N * K - 1], E, N, K),
        weights_err,
    );
    for (experts, n, k) in [(0, N, K), (E, 0, K), (E, N, 0)] {
        let zero_dim = |e: &Error| {
            matches!(
                e,
                Error::InvalidArgument {
                    what: "expert weights",
                    ..
                }
            )
        };
        cat.expect(
            &format!("DenseExperts::from_bits [{experts}, {n}, {k}]"),
            DenseExperts::from_bits(gpu, &[], experts, n, k),
            zero_dim,
        );
    }
}

/// The dequant kernel wrapper: shape, buffer lengths, expert ids.
fn dequant_rules(cat: &mut Catalog<'_>) {
    let gpu = cat.gpu;
    let host = quantize_mxfp4(&Rng::new(0xDE).normal_bf16(E * N * K, 1.0), E, N, K).unwrap();
    let (p, s) = (
        upload(gpu, host.packed()).unwrap(),
        upload(gpu, host.scales()).unwrap(),
    );
    let shape_err = |e: &Error| {
        matches!(
            e,
            Error::InvalidArgument {
                what: "dequant shape",
                ..
            }
        )
    };
    cat.expect(
        "dequant with n = 0",
        dequant_mxfp4_bf16(gpu, &p, &s, E, 0, K, &[0]),
        shape_err,
    );
    cat.expect(
        "dequant with k = 0",
        dequant_mxfp4_bf16(gpu, &p, &s, E, N, 0, &[0]),
        shape_err,
    );
    cat.expect(
        "dequant with k = 48",
        dequant_mxfp4_bf16(gpu, &p, &s, E, N, 48, &[0]),
        shape_err,
    );
    cat.expect(
        "dequant with packed for E experts, E + 1 declared",
        dequant_mxfp4_bf16(gpu, &p, &s, E + 1, N, K, &[0]),
        |e| {
            matches!(
                e,
                Error::Shape {
                    tensor: "packed",
                    ..
                }
            )
        },
    );
    let s_short = upload(gpu, &host.scales()[1..]).unwrap();
    cat.expect(
        "dequant with scales one byte short",
        dequant_mxfp4_bf16(gpu, &p, &s_short, E, N, K, &[0]),
        |e| {
            matches!(
                e,
                Error::Shape {
                    tensor: "scales",
                    ..
                }
            )
        },
    );
    for bad in [E as u32, u32::MAX] {
        cat.expect(
            &format!("dequant of expert {bad} of {E}"),
            dequant_mxfp4_bf16(gpu, &p, &s, E, N, K, &[0, bad]),
            |e| {
                matches!(
                    e,
                    Error::InvalidArgument {
                        what: "experts",
                        ..
                    }
                )
            },
        );
    }
    // The valid call still decodes exactly what the CPU does.
    let all = dequant_mxfp4_bf16(gpu, &p, &s, E, N, K, &[0, 1, 2, 3]).unwrap();
    assert_eq!(
        gpu.stream().clone_dtoh(&all).unwrap(),
        dequantize_bf16(&host),
        "device dequant after the bad calls"
    );
}

#[test]
fn every_bad_input_returns_its_typed_error_and_leaves_the_device_usable() {
    let Some(gpu) = gpu() else { return };
    let mut cat = Catalog { gpu, checked: 0 };
    let w = Rng::new(0x57).normal_bf16(E * N * K, 1.0);
    let dense = DenseExperts::from_f32(gpu, &w, E, N, K).unwrap();
    let mx = MxExperts::upload(gpu, &quantize_mxfp4(&w, E, N, K).unwrap()).unwrap();
    forward_and_backward_rules(
        &mut cat,
        ExpertWeights::Bf16(&dense),
        Strategy::Fused,
        "bf16",
    );
    for strategy in [Strategy::Fused, Strategy::SelectiveDequant, Strategy::Auto] {
        forward_and_backward_rules(
            &mut cat,
            ExpertWeights::Mxfp4(&mx),
            strategy,
            &format!("MXFP4 {strategy:?}"),
        );
    }
    dimension_rules(&mut cat);
    routing_rules(&mut cat);
    bad_device_id_acts_as_dropped(gpu);
    container_rules(&mut cat);
    buffer_rules(&mut cat);
    dequant_rules(&mut cat);
    println!(
        "{} bad inputs checked: each gave its typed error and left the stream healthy",
        cat.checked
    );

    // A valid call after all of them: forward and backward match the reference.
    gpu.synchronize().expect("the stream is healthy");
    let c = Case {
        gates: true,
        output: RowOrder::Scattered,
        ..Case::new(8, 128, 64, 40, 2, 8, 0x600D)
    };
    let d = draw(&c);
    let dy = Rng::new(0x600E).normal_bf16(out_rows(&c) * c.n, 1.0);
    let got = run_gpu_with(gpu, &c, &d, &dy, Base::Dense(&d.w));
    compare(&c, &d, &d.w, &dy, &got);
}

/// Forward output (f32) of a case with the given x, output order, gates flag and base.
fn forward_out(
    gpu: &Runtime,
    c: &Case,
    d: &Data,
    x: &[f32],
    output: RowOrder,
    gates: bool,
    base: Base<'_>,
) -> Vec<f32> {
    let routing = DeviceRouting::from_host_ids(gpu, &d.ids, c.t, c.top_k, c.e).unwrap();
    let x = Bf16Matrix::from_f32(gpu, x, d.x_rows, c.k).unwrap();
    let (dense, mx, nv);
    let (weights, strategy) = match base {
        Base::Dense(w) => {
            dense = DenseExperts::from_f32(gpu, w, c.e, c.n, c.k).unwrap();
            (ExpertWeights::Bf16(&dense), Strategy::Fused)
        }
        Base::Mx(m, s) => {
            mx = MxExperts::upload(gpu, m).unwrap();
            (ExpertWeights::Mxfp4(&mx), s)
        }
        Base::Nv(w, s, _) => {
            nv = mxmoe::op::NvExperts::upload(gpu, w).unwrap();
            (ExpertWeights::Nvfp4(&nv), s)
        }
        Base::MxRecompute(_) => unreachable!("forward only"),
    };
    let lw = upload_lora(gpu, c, d);
    let g = gates.then(|| {
        Bf16Matrix::from_f32(
            gpu,
            d.gates.as_ref().expect("drawn with gates"),
            c.t,
            c.top_k,
        )
        .unwrap()
    });
    let layer = ExpertLinear::new(weights, Some(&lw), c.input, output).with_strategy(strategy);
    layer
        .forward(gpu, &x, &routing, g.as_ref())
        .unwrap()
        .0
        .out
        .to_f32(gpu)
        .unwrap()
}

#[test]
fn nan_in_x_reaches_exactly_the_output_rows_that_read_it() {
    let Some(gpu) = gpu() else { return };
    // Token-ordered input: token 7 feeds slots 21, 22, 23; slot 22 is dropped (never reads x).
    let c = Case {
        gates: true,
        ..Case::new(6, 64, 48, 20, 3, 8, 0x4A4)
    };
    let (t0, dropped_slot) = (7, 7 * 3 + 1);
    let mut d = draw(&c);
    d.ids[dropped_slot] = -1;
    let mx = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    let mut x_nan = d.x.clone();
    x_nan[t0 * c.k + 5] = f32::NAN;
    let routing = mxmoe::reference::flatten_sort_count(&d.ids, c.t, c.top_k, c.e).unwrap();
    let reads_t0 = |slot: usize| slot / c.top_k == t0 && slot != dropped_slot;

    for base in [
        Base::Dense(&d.w),
        Base::Mx(&mx, Strategy::Fused),
        Base::Mx(&mx, Strategy::SelectiveDequant),
    ] {
        let name = match base {
            Base::Dense(_) => "bf16".to_string(),
            Base::Mx(_, s) => format!("MXFP4 {s:?}"),
            Base::Nv(_, s, _) => format!("NVFP4 {s:?}"),
            Base::MxRecompute(_) => unreachable!(),
        };
        // (output order, gates, which output rows read token t0).
        let grouped_reads: Vec<bool> = (0..c.t * c.top_k)
            .map(|p| {
                routing
                    .sorted_scattered_idxs
                    .get(p)
                    .is_some_and(|&s| reads_t0(s as usize))
            })
            .collect();
        let slot_reads: Vec<bool> = (0..c.t * c.top_k).map(reads_t0).collect();
        let token_reads: Vec<bool> = (0..c.t).map(|t| t == t0).collect();
        for (output, gates, reads) in [
            (RowOrder::Grouped, false, grouped_reads),
            (RowOrder::Scattered, false, slot_reads),
            (RowOrder::Scattered, true, token_reads),
        ] {
            let clean = forward_out(gpu, &c, &d, &d.x, output, gates, base);
            let poisoned = forward_out(gpu, &c, &d, &x_nan, output, gates, base);
            let what = format!("{name}, {output:?} output, gates {gates}");
            assert_eq!(
                reads.iter().filter(|&&r| r).count(),
                if gates { 1 } else { 2 },
                "{what}: fixture"
            );
            for (row, &nan_row) in reads.iter().enumerate() {
                let (got, before) = (
                    &poisoned[row * c.n..(row + 1) * c.n],
                    &clean[row * c.n..(row + 1) * c.n],
                );
                if nan_row {
                    assert!(
                        got.iter().all(|v| v.is_nan()),
                        "{what}: row {row} reads the NaN but has non-NaN values"
                    );
                } else {
                    assert!(
                        got.iter()
                            .zip(before)
                            .all(|(a, b)| a.to_bits() == b.to_bits() && a.is_finite()),
                        "{what}: row {row} does not read the NaN but changed"
                    );
                }
            }
        }
    }
}
