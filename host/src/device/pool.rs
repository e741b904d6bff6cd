//! Peak device memory as PyTorch's `max_memory_allocated` reports it: the high-water mark of
//! bytes handed out by the stream-ordered allocator's pool (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`).
//!
//! cudarc allocates with `cuMemAllocAsync` from the device's current memory pool whenever the
//! device supports pools (every sm_90 part), so this watermark sees every buffer mxmoe allocates,
//! including transients that live only inside one launch sequence, which a `cuMemGetInfo`
//! sample taken after a synchronisation misses. (cudarc has no safe wrapper for pool attributes
//! yet, hence the raw calls here.)

use super::Gpu;
use crate::error::{Error, Result};
use cudarc::driver::result::{device, mem_pool};
use cudarc::driver::sys::{CUmemPool_attribute as PoolAttr, CUmemoryPool};

/// The device's current memory pool, watched for its usage.
pub struct PoolWatch<'a> {
    gpu: &'a Gpu,
    pool: CUmemoryPool,
}

impl<'a> PoolWatch<'a> {
    /// The pool of `gpu`'s device, or `None` when the device allocates without pools (then
    /// cudarc uses `cuMemAlloc` and only `cuMemGetInfo` can see usage).
    pub fn new(gpu: &'a Gpu) -> Result<Option<Self>> {
        let ctx = gpu.context();
        if !ctx.has_async_alloc() {
            return Ok(None);
        }
        ctx.bind_to_thread()
            .map_err(Error::driver("binding the CUDA context"))?;
        // SAFETY: `cu_device` is the handle of the device the open context was created on.
        let pool = unsafe { device::get_mem_pool(ctx.cu_device()) }
            .map_err(Error::driver("looking up the device's memory pool"))?;
        Ok(Some(Self { gpu, pool }))
    }

    fn get(&self, attr: PoolAttr) -> Result<u64> {
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(Error::driver("binding the CUDA context"))?;
        let mut value: u64 = 0;
        // SAFETY: the pool is the device's current pool, valid while the context `self.gpu` owns
        // is alive; the USED_MEM_* attributes are `cuuint64_t`, matching the `u64` written to.
        unsafe { mem_pool::get_attribute(self.pool, attr, (&raw mut value).cast()) }.map_err(
            Error::driver(format!("reading memory pool attribute {attr:?}")),
        )?;
        Ok(value)
    }

    /// Bytes currently allocated from the pool.
    pub fn used(&self) -> Result<u64> {
        self.get(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The most bytes allocated at once since the last [`reset_peak`](Self::reset_peak).
    pub fn peak(&self) -> Result<u64> {
        self.get(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Resets the high-water mark (to the current usage, as the driver defines it).
    pub fn reset_peak(&self) -> Result<()> {
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(Error::driver("binding the CUDA context"))?;
        let mut zero: u64 = 0;
        // SAFETY: as in `get`; USED_MEM_HIGH may only be set to zero, which is what we pass.
        unsafe {
            mem_pool::set_attribute(
                self.pool,
                PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&raw mut zero).cast(),
            )
        }
        .map_err(Error::driver("resetting the memory pool's high-water mark"))?;
        Ok(())
    }
}
