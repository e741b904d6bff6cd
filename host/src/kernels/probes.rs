//! Host side of the probe kernels (`kernels-gpu/src/kernels/probes.rs`). Each returns what the
//! device computed; the tests compare it with a CPU computation.

use kernels_gpu::shared::names;
use kernels_gpu::shared::params::ProbeParams;

use cudarc::driver::DeviceRepr;

use super::spec;
use crate::device::{Gpu, alloc_filled, download, upload};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Launches probe `name` on `blocks` blocks of `threads` threads with `smem_bytes` of dynamic
/// shared memory, reading `count` items at `in_addr` (0: no input) and writing a fresh output of
/// `out_elems` elements (poisoned first), which it returns.
///
/// # Safety
///
/// `(blocks, threads)`, `smem_bytes` and `count` are what `name`'s launch contract asks for,
/// `in_addr` is a live device allocation holding what the probe reads for `count` (or 0 when it
/// reads nothing) and `out_elems` is what it writes.
unsafe fn run<T: DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    name: &'static str,
    (blocks, threads): (u32, u32),
    smem_bytes: usize,
    (in_addr, count): (u64, u32),
    out_elems: usize,
) -> Result<Vec<T>> {
    let mut out = alloc_filled::<T>(gpu, out_elems, 0xFF)?;
    let params = ProbeParams {
        in_addr,
        out_addr: addr_mut(gpu, &mut out),
        count,
        _pad: 0,
    };
    // SAFETY: the launch shape, input and count are the caller's (see `# Safety`); `out` was
    // just allocated with the element count the probe writes.
    unsafe { gpu.launch(&spec(name, threads, smem_bytes), (blocks, 1, 1), params)? };
    download(gpu, &out)
}

/// Runs the special-register probe on `blocks × threads` threads; returns
/// `[tid.x, ctaid.x, laneid, warp id]` per global thread.
pub fn sreg(gpu: &Gpu, blocks: u32, threads: u32) -> Result<Vec<[u32; 4]>> {
    let count = blocks * threads;
    // SAFETY: `out` holds 4·count u32 as the kernel's contract requires; no input is read.
    let flat: Vec<u32> = unsafe {
        run(
            gpu,
            names::PROBE_SREG,
            (blocks, threads),
            0,
            (0, count),
            4 * count as usize,
        )?
    };
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
    let input_arg = (addr(gpu, &inp), input.len() as u32);
    // SAFETY: one block of 32 threads with 512 bytes of shared memory; `in` holds 512 ≥ count
    // bytes (16-aligned allocation), `out` 512 bytes.
    unsafe { run(gpu, names::PROBE_CP_ASYNC, (1, 32), 512, input_arg, 512) }
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
    // SAFETY: one block of 32 threads, 2048 bytes of shared memory, `in` holds 384 bf16 and
    // `out` 256 f32 as the contract requires.
    let d: Vec<f32> = unsafe {
        run(
            gpu,
            names::PROBE_MMA,
            (1, 32),
            2048,
            (addr(gpu, &inp), 384),
            256,
        )?
    };
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
    let count = pairs.len() as u32;
    let threads = 128;
    let shape = (count.div_ceil(threads), threads);
    // SAFETY: `in` holds 2·count f32 and `out` 2·count u32.
    let d: Vec<u32> = unsafe {
        run(
            gpu,
            names::PROBE_CVT,
            shape,
            0,
            (addr(gpu, &inp), count),
            flat.len(),
        )?
    };
    Ok(d.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}
