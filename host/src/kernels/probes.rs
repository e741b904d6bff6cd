//! Host side of the probe kernels (`kernels-gpu/src/kernels/probes.rs`). Each returns what the
//! device computed; the tests compare it with a CPU computation.

use kernels_gpu::shared::names;
use kernels_gpu::shared::params::ProbeParams;

use super::MIN_CC;
use crate::device::{Gpu, alloc_poisoned, download, upload};
use crate::error::{Error, Result};
use crate::launch::{LaunchSpec, addr, addr_mut};

/// Runs the special-register probe on `blocks × threads` threads; returns
/// `[tid.x, ctaid.x, laneid, warp id]` per global thread.
pub fn sreg(gpu: &Gpu, blocks: u32, threads: u32) -> Result<Vec<[u32; 4]>> {
    let count = blocks * threads;
    let mut out = alloc_poisoned::<u32>(gpu, 4 * count as usize, 0xFF)?;
    let spec = LaunchSpec {
        name: names::PROBE_SREG,
        threads,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    let params = ProbeParams {
        in_addr: 0,
        out_addr: addr_mut(gpu, &mut out),
        count,
        _pad: 0,
    };
    // SAFETY: `out` holds 4·count u32 as the kernel's contract requires; no input is read.
    unsafe { gpu.launch(&spec, (blocks, 1, 1), params)? };
    let flat = download(gpu, &out)?;
    Ok(flat
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}

/// Copies `input` (at most 512 bytes) through shared memory with `cp.async`; returns the 512
/// bytes the kernel wrote (the input, then zero fill).
pub fn cp_async(gpu: &Gpu, input: &[u8]) -> Result<Vec<u8>> {
    if input.len() > 512 {
        return Err(Error::Shape {
            tensor: "probe input",
            expected: "at most 512 bytes".into(),
            actual: format!("{} bytes", input.len()),
        });
    }
    // Pad the device copy to 512 bytes so every 16-byte source row is allocated; the kernel
    // still reads only `count` bytes.
    let mut padded = input.to_vec();
    padded.resize(512, 0xAB);
    let inp = upload(gpu, &padded)?;
    let mut out = alloc_poisoned::<u8>(gpu, 512, 0xFF)?;
    let spec = LaunchSpec {
        name: names::PROBE_CP_ASYNC,
        threads: 32,
        dynamic_smem_bytes: 512,
        min_cc: MIN_CC,
    };
    let params = ProbeParams {
        in_addr: addr(gpu, &inp),
        out_addr: addr_mut(gpu, &mut out),
        count: input.len() as u32,
        _pad: 0,
    };
    // SAFETY: one block of 32 threads with 512 bytes of shared memory; `in` holds 512 ≥ count
    // bytes (16-aligned allocation), `out` 512 bytes.
    unsafe { gpu.launch(&spec, (1, 1, 1), params)? };
    download(gpu, &out)
}

/// Result of the MMA probe: `A·B` computed from both fragment-loading paths.
#[derive(Clone, Debug, PartialEq)]
pub struct MmaProbe {
    /// A from `[M][K]` (`ldmatrix.x4`), B from `[N][K]` (`ldmatrix.x2`); `[16][8]` row-major.
    pub non_trans: Vec<f32>,
    /// A from `[K][M]` (`ldmatrix.x4.trans`), B from `[K][N]` (`ldmatrix.x2.trans`).
    pub trans: Vec<f32>,
}

/// Multiplies a 16×16 bf16 A (row-major bits) by a 16×8 bf16 B (`[K][N]` row-major bits) with
/// one `mma.sync.m16n8k16`.
pub fn mma(gpu: &Gpu, a: &[u16; 256], b: &[u16; 128]) -> Result<MmaProbe> {
    let mut input = Vec::with_capacity(384);
    input.extend_from_slice(a);
    input.extend_from_slice(b);
    let inp = upload(gpu, &input)?;
    let mut out = alloc_poisoned::<f32>(gpu, 256, 0xFF)?;
    let spec = LaunchSpec {
        name: names::PROBE_MMA,
        threads: 32,
        dynamic_smem_bytes: 2048,
        min_cc: MIN_CC,
    };
    let params = ProbeParams {
        in_addr: addr(gpu, &inp),
        out_addr: addr_mut(gpu, &mut out),
        count: 384,
        _pad: 0,
    };
    // SAFETY: one block of 32 threads, 2048 bytes of shared memory, `in` holds 384 bf16 and
    // `out` 256 f32 as the contract requires.
    unsafe { gpu.launch(&spec, (1, 1, 1), params)? };
    let d = download(gpu, &out)?;
    Ok(MmaProbe {
        non_trans: d[..128].to_vec(),
        trans: d[128..].to_vec(),
    })
}

/// For each pair `(lo, hi)`: `cvt.rn.bf16x2.f32` of the pair and that word squared with
/// `mul.rn.bf16x2`.
pub fn cvt(gpu: &Gpu, pairs: &[(f32, f32)]) -> Result<Vec<(u32, u32)>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let flat: Vec<f32> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    let inp = upload(gpu, &flat)?;
    let mut out = alloc_poisoned::<u32>(gpu, flat.len(), 0xFF)?;
    let count = pairs.len() as u32;
    let threads = 128;
    let spec = LaunchSpec {
        name: names::PROBE_CVT,
        threads,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    let params = ProbeParams {
        in_addr: addr(gpu, &inp),
        out_addr: addr_mut(gpu, &mut out),
        count,
        _pad: 0,
    };
    // SAFETY: `in` holds 2·count f32 and `out` 2·count u32.
    unsafe { gpu.launch(&spec, (count.div_ceil(threads), 1, 1), params)? };
    let d = download(gpu, &out)?;
    Ok(d.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}
