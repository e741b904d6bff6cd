//! The README's library example: MXFP4 experts, GPU routing, one LoRA-fused expert projection
//! forward and backward. `cargo run --release -p mxmoe --example quickstart` (needs a GPU; says
//! why it stops otherwise).

use mxmoe::Runtime;
use mxmoe::mxfp4::quantize_mxfp4;
use mxmoe::op::{
    Bf16Matrix, DequantBuffer, ExpertLinear, ExpertWeights, LoraWeights, MxExperts, RowOrder,
    Strategy, backward,
};
use mxmoe::routing::DeviceRouting;

fn main() -> mxmoe::Result<()> {
    let (e, n, k, t, top_k, r) = (8, 256, 512, 64, 2, 16); // K % 32 == 0 for MXFP4
    let data = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * scale)
            .collect()
    };

    // The device and its tile-configuration tuner; Error::NoDriver / Error::NoDevice without a GPU.
    let rt = Runtime::open(0)?;

    // Frozen experts W_store [E, N, K] → MXFP4 on the host (torchao FLOOR, bit-exact) → device.
    let w = MxExperts::upload(&rt, &quantize_mxfp4(&data(e * n * k, 0.1), e, n, k)?)?;

    // Top-k expert ids [T, k] (i64; -1 drops a slot) → expert-grouped order, on the GPU.
    let ids: Vec<i64> = (0..t)
        .flat_map(|i| [(i % e) as i64, ((i + 3) % e) as i64])
        .collect();
    let routing = DeviceRouting::from_host_ids(&rt, &ids, t, top_k, e)?;

    let x = Bf16Matrix::from_f32(&rt, &data(t * k, 2.0), t, k)?; // token order [T, K]
    let lora = LoraWeights {
        a: Bf16Matrix::from_f32(&rt, &data(e * r * k, 0.02), e * r, k)?, // A [E·r, K]
        b: Bf16Matrix::from_f32(&rt, &data(n * e * r, 0.02), n, e * r)?, // B [N, E·r]
        rank: r,
        scaling: 2.0, // lora_alpha / r
    };
    let layer = ExpertLinear {
        weights: ExpertWeights::Mxfp4(&w),
        lora: Some(&lora),
        input_order: RowOrder::Scattered,    // x rows are tokens
        output_order: RowOrder::Grouped,     // out rows are slots, grouped by expert: [T·k, N]
        strategy: Strategy::Fused,           // Strategy B; Strategy::Auto chooses per call
        dequant_buffer: DequantBuffer::Keep, // used by Strategy A only
        bias: None,                          // optional frozen per-expert bias [E, N]
    };

    let (fwd, saved) = layer.forward(&rt, &x, &routing, None)?; // None: no gates
    drop(x); // `saved` shares what backward reads (x, routing, weights, LoRA): no borrow
    let dy = Bf16Matrix::from_f32(&rt, &data(t * top_k * n, 1.0), t * top_k, n)?;
    let grads = backward(&rt, &saved, &dy)?; // dx, da, db (d_gates with gates)
    println!("{:?} {:?} {:?}", fwd.out, grads.dx, grads.da);
    Ok(())
}
