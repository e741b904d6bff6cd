//! Concurrency: the same forward + backward (bf16, MXFP4 fused, MXFP4 selective) run from two
//! host threads at once gives results bitwise equal to a serial run, both
//! - with a `Gpu` per thread (`Gpu::open(0)` twice: the same device, one stream each), and
//! - with one `Gpu` shared by both threads through `&Runtime` (`Gpu` is `Sync`, checked at compile
//!   time below; both threads then enqueue onto its one stream).
//!
//! The kernels use no atomics and every tile configuration sums in the same order, so any
//! difference would come from a race (shared state in the host library, buffers freed or reused
//! while in flight, a stream mix-up), not from floating-point reordering.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Barrier;

use mxmoe::Runtime;
use mxmoe::device::Gpu;
use mxmoe::mxfp4::{MxWeights, dequantize_f32, quantize_mxfp4};
use mxmoe::op::{RowOrder, Strategy};
use mxmoe_tests::linear_case::{Base, Case, Data, GpuResult, draw, out_rows, run_gpu_with};
use mxmoe_tests::{Rng, gpu, test_runtime};

/// `Runtime` can be shared between threads by reference (the second test relies on it).
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Runtime>();
};

/// Rounds of all three bases each thread runs.
const ROUNDS: usize = 6;

/// The shared inputs: one gated down-projection-shaped case, its MXFP4 container and dy.
struct Inputs {
    case: Case,
    data: Data,
    mx: MxWeights,
    dy: Vec<f32>,
}

impl Inputs {
    fn new() -> Self {
        let case = Case {
            gates: true,
            output: RowOrder::Scattered,
            ..Case::new(16, 512, 256, 300, 4, 16, 0xC0C0)
        };
        let data = draw(&case);
        // Quantize-dequantize W so the bf16 run sees the same values as the MXFP4 runs.
        let mx = quantize_mxfp4(&data.w, case.e, case.n, case.k).unwrap();
        let data = Data {
            w: dequantize_f32(&mx),
            ..data
        };
        let dy = Rng::new(0xC0C1).normal_bf16(out_rows(&case) * case.n, 1.0);
        Inputs { case, data, mx, dy }
    }

    /// The bases every run covers, in order.
    fn bases(&self) -> [(&'static str, Base<'_>); 3] {
        [
            ("bf16", Base::Dense(&self.data.w)),
            ("MXFP4 fused", Base::Mx(&self.mx, Strategy::Fused)),
            (
                "MXFP4 selective",
                Base::Mx(&self.mx, Strategy::SelectiveDequant),
            ),
        ]
    }

    fn run(&self, gpu: &Runtime, base: Base<'_>) -> GpuResult {
        run_gpu_with(gpu, &self.case, &self.data, &self.dy, base)
    }
}

/// `Err` naming the first tensor where `a` and `b` are not bitwise equal.
fn bitwise_equal(a: &GpuResult, b: &GpuResult) -> Result<(), String> {
    let same = |x: &[f32], y: &[f32]| {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
    };
    let same_opt = |x: &Option<Vec<f32>>, y: &Option<Vec<f32>>| match (x, y) {
        (Some(x), Some(y)) => same(x, y),
        (None, None) => true,
        _ => false,
    };
    let checks = [
        ("out", same(&a.out, &b.out)),
        ("dx", same(&a.dx, &b.dx)),
        ("dA", same_opt(&a.da, &b.da)),
        ("dB", same_opt(&a.db, &b.db)),
        ("d_gates", same_opt(&a.d_gates, &b.d_gates)),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((what, _)) => Err(format!("{what} differs from the serial run")),
        None => Ok(()),
    }
}

/// Runs every base serially on `serial`, then `ROUNDS` rounds on each of `gpus` from its own
/// thread at once (the rounds start together; the second thread runs the bases in reverse order
/// so that different kernels overlap), each result checked bitwise against the serial one.
/// Failures (including panics of a run) are collected, so neither thread can leave the other
/// waiting at the barrier.
fn concurrent_matches_serial(serial: &Runtime, gpus: [&Runtime; 2]) {
    let inputs = Inputs::new();
    let expected: Vec<GpuResult> = inputs
        .bases()
        .iter()
        .map(|&(_, base)| inputs.run(serial, base))
        .collect();
    let start = Barrier::new(2);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = gpus
            .into_iter()
            .enumerate()
            .map(|(thread, gpu)| {
                let (inputs, expected, start) = (&inputs, &expected, &start);
                s.spawn(move || {
                    let bases = inputs.bases();
                    let mut order: Vec<usize> = (0..bases.len()).collect();
                    if thread == 1 {
                        order.reverse();
                    }
                    let mut failures = Vec::new();
                    for round in 0..ROUNDS {
                        start.wait();
                        for &i in &order {
                            let (name, base) = bases[i];
                            let outcome = catch_unwind(AssertUnwindSafe(|| inputs.run(gpu, base)))
                                .map_err(|p| {
                                    p.downcast_ref::<String>()
                                        .cloned()
                                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                        .unwrap_or_default()
                                })
                                .and_then(|got| bitwise_equal(&got, &expected[i]));
                            if let Err(e) = outcome {
                                failures
                                    .push(format!("thread {thread}, round {round}, {name}: {e}"));
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("runs catch their panics"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "concurrent runs differ from the serial run:\n{}",
        failures.join("\n")
    );
    println!(
        "2 threads × {ROUNDS} rounds × {} bases: bitwise equal to the serial run",
        expected.len()
    );
}

#[test]
fn two_gpus_on_one_device_running_concurrently_match_a_serial_run_bitwise() {
    let Some(serial) = gpu() else { return };
    let first = test_runtime(Gpu::open(0).expect("opening device 0 a second time"));
    let second = test_runtime(Gpu::open(0).expect("opening device 0 a third time"));
    assert!(
        !std::sync::Arc::ptr_eq(first.stream(), second.stream()),
        "each Gpu has its own stream"
    );
    concurrent_matches_serial(serial, [&first, &second]);
}

#[test]
fn one_gpu_shared_by_two_threads_matches_a_serial_run_bitwise() {
    let Some(shared) = gpu() else { return };
    concurrent_matches_serial(shared, [shared, shared]);
}
