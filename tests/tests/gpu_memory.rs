//! Strategy B never allocates a bf16 copy of the experts: the stream-ordered allocator's
//! high-water mark over one fused forward + backward stays far below `E·N·K` bf16 bytes. Alone in
//! its test binary, so no concurrent test moves the watermark.

use mxmoe::mxfp4::quantize_mxfp4;
use mxmoe::op::Strategy;
use mxmoe_tests::linear_case::{Case, draw, out_rows, upload_lora};
use mxmoe_tests::{Rng, gpu};

#[test]
fn fused_path_allocates_no_bf16_copy_of_the_experts() {
    use mxmoe::op::{Bf16Matrix, ExpertLinear, ExpertWeights, MxExperts, backward};
    use mxmoe::routing::DeviceRouting;
    let Some(gpu) = gpu() else { return };
    // 64 experts of 1024×2048: a bf16 copy would be 256 MiB; the MXFP4 container is 68 MiB.
    let c = Case::new(64, 2048, 1024, 64, 2, 16, 400);
    let d = draw(&c);
    let mx = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    let bf16_copy = c.e * c.n * c.k * 2;
    let weights = MxExperts::upload(gpu, &mx).unwrap();
    let routing = DeviceRouting::from_host_ids(gpu, &d.ids, c.t, c.top_k, c.e).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &d.x, d.x_rows, c.k).unwrap();
    let lora = upload_lora(gpu, &c, &d);
    let dy = Bf16Matrix::from_f32(
        gpu,
        &Rng::new(401).normal_bf16(out_rows(&c) * c.n, 1.0),
        out_rows(&c),
        c.n,
    )
    .unwrap();
    gpu.synchronize().unwrap();
    // The stream-ordered allocator's high-water mark sees every buffer, transients included.
    let pool = mxmoe::device::PoolWatch::new(gpu)
        .unwrap()
        .expect("sm_90 devices allocate from memory pools");
    let before = pool.used().unwrap();
    pool.reset_peak().unwrap();
    let layer = ExpertLinear::new(
        ExpertWeights::Mxfp4(&weights),
        Some(&lora),
        c.input,
        c.output,
    )
    .with_strategy(Strategy::Fused);
    let (fwd, saved) = layer.forward(gpu, &x, &routing, None).unwrap();
    let grads = backward(gpu, &saved, &dy).unwrap();
    gpu.synchronize().unwrap();
    let peak = pool.peak().unwrap();
    let used = peak.saturating_sub(before) as usize;
    println!(
        "peak device memory of one fused fwd+bwd: {used} bytes (a bf16 copy of the experts: {bf16_copy})"
    );
    // Outputs, XA/YB, dX slots and gradients: ~10 MB here; a bf16 expert copy would be 256 MiB.
    assert!(used > 0, "the watermark saw no allocation at all");
    assert!(
        used < bf16_copy / 8,
        "{used} bytes at peak: an expert copy may have been made"
    );
    drop((fwd, grads));
}
