//! Device memory: host↔device copies, filled and (in tests) poisoned allocations, and [`DeviceBuffer`], an allocation
//! that mxmoe either owns (freed on drop, stream-ordered) or borrows from another framework
//! (never freed: handed back with cudarc's `CudaSlice::leak`).
//!
//! Whether a buffer is borrowed travels with the buffer itself, so a tensor built on borrowed
//! memory can be shared (reference-counted) like any other: whichever handle drops last hands
//! the memory back instead of freeing it.

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice};

use super::Gpu;
use crate::error::{Error, Result};

/// A device allocation, owned or borrowed. Derefs to cudarc's [`CudaSlice`] for reading only:
/// there is no `DerefMut`, since replacing the slice inside a borrowed buffer would free memory
/// mxmoe does not own.
pub struct DeviceBuffer<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    borrowed: bool,
}

impl<T> DeviceBuffer<T> {
    /// An allocation mxmoe owns: freed (stream-ordered) when dropped.
    pub fn owned(slice: CudaSlice<T>) -> Self {
        Self {
            slice: ManuallyDrop::new(slice),
            borrowed: false,
        }
    }

    /// Whether the memory belongs to someone else (see [`Gpu::borrow_slice`]).
    pub fn is_borrowed(&self) -> bool {
        self.borrowed
    }
}

impl<T> Deref for DeviceBuffer<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `slice` is not used afterwards.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        if self.borrowed {
            // The owner frees it; cudarc's `leak` releases the wrapper without `cuMemFree`.
            let _ = slice.leak();
        }
    }
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("len", &self.slice.len())
            .field("borrowed", &self.borrowed)
            .finish()
    }
}

impl Gpu {
    /// Wraps `len` elements at device address `ptr` as a borrowed [`DeviceBuffer`] on this
    /// `Gpu`'s stream; it is never freed by mxmoe.
    ///
    /// # Safety
    ///
    /// `ptr` must address at least `len` valid, suitably aligned `T` in this context, kept alive
    /// (and not reused) by its owner for as long as the buffer, or any tensor sharing it,
    /// exists and work queued on it runs.
    pub unsafe fn borrow_slice<T: DeviceRepr>(&self, ptr: u64, len: usize) -> DeviceBuffer<T> {
        // SAFETY: forwarded to the caller; the slice goes straight into a borrowed buffer,
        // which never frees it.
        let slice = unsafe { self.stream().upgrade_device_ptr::<T>(ptr, len) };
        DeviceBuffer {
            slice: ManuallyDrop::new(slice),
            borrowed: true,
        }
    }
}

/// Uploads a host slice.
pub fn upload<T: DeviceRepr>(gpu: &Gpu, data: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream()
        .clone_htod(data)
        .map_err(Error::driver("copying to the device"))
}

/// Downloads a device buffer (synchronizes the stream).
pub fn download<T: DeviceRepr + Default + Clone>(gpu: &Gpu, buf: &CudaSlice<T>) -> Result<Vec<T>> {
    gpu.stream()
        .clone_dtoh(buf)
        .map_err(Error::driver("copying from the device"))
}

/// Page-locked host buffers of one [`Gpu`], reused by [`download_async`] (a page-locked
/// allocation costs far more than the copy it serves), and the side stream those copies run on.
#[derive(Default)]
pub(crate) struct Staging {
    free: std::sync::Mutex<Vec<Staged>>,
    /// The copies' own stream and the event that orders each copy after the work queued so far
    /// on the `Gpu`'s stream; made at the first copy.
    side: std::sync::Mutex<Option<(Arc<CudaStream>, CudaEvent)>>,
}

/// A page-locked buffer of [`Staging`] and the event recorded after each copy into it (made
/// once with the buffer, re-recorded per copy). cudarc's own event of the buffer is a
/// blocking-sync one: waiting on it puts the thread to sleep, and the wake-up came late enough
/// that the device ran out of queued work (`Auto` at B shapes: +0.1–0.2 ms per call on an
/// H100). This one has default flags: its wait follows the context's scheduling policy (a spin
/// while the host has cores to spare), like the rest of the host's waits.
struct Staged {
    host: PinnedHostSlice<u32>,
    copied: CudaEvent,
}

/// A copy from the device into page-locked host memory, queued by [`download_async`] on a side
/// stream after the work queued so far on the [`Gpu`]'s stream. [`wait`](Self::wait) blocks
/// until that copy is done — not until the work queued after it — so the host can queue
/// kernels first and read the answer while they run; and the `Gpu`'s stream does not wait for
/// the copy either (its next kernel starts when the last one before the copy ends).
pub(crate) struct PendingDownload<'g> {
    gpu: &'g Gpu,
    /// The buffer being copied into; back to the pool on drop.
    staged: Option<Staged>,
    len: usize,
    /// Whether [`wait`](Self::wait) saw the copy finish.
    done: bool,
}

/// Queues a copy of `buf` into a page-locked host buffer of `gpu` and returns without waiting.
/// The copy reads `buf` once the work queued on `gpu`'s stream before this call is done, on a
/// side stream: the returned [`PendingDownload`] must be waited for or dropped (its drop waits
/// for an unfinished copy) before `buf` is freed, which the borrow of `buf` cannot enforce —
/// callers keep `buf` alive past the pending copy.
pub(crate) fn download_async<'g>(
    gpu: &'g Gpu,
    buf: &CudaSlice<u32>,
) -> Result<PendingDownload<'g>> {
    let len = buf.len();
    let reused = {
        let mut free = gpu.staging().free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter()
            .position(|s| s.host.len() >= len)
            .map(|i| free.swap_remove(i))
    };
    let mut staged = match reused {
        Some(s) => s,
        None => Staged {
            // SAFETY: the memory is not initialised; it is read only through
            // `PendingDownload::wait`, and only its first `len` elements, which the copy queued
            // below writes first.
            host: unsafe { gpu.context().alloc_pinned_with_flags::<u32>(len.max(1), 0) }
                .map_err(Error::driver("allocating page-locked host memory"))?,
            copied: copy_event(gpu)?,
        },
    };
    let mut side = gpu.staging().side.lock().unwrap_or_else(|p| p.into_inner());
    let (stream, ready) = match side.take() {
        Some(s) => s,
        None => (
            gpu.context()
                .new_stream()
                .map_err(Error::driver("creating the copy stream"))?,
            copy_event(gpu)?,
        ),
    };
    let queued = ready
        .record(gpu.stream())
        .and_then(|()| stream.wait(&ready))
        .and_then(|()| stream.memcpy_dtoh(buf, &mut staged.host))
        .and_then(|()| staged.copied.record(&stream));
    *side = Some((stream, ready));
    queued.map_err(Error::driver("copying from the device"))?;
    Ok(PendingDownload {
        gpu,
        staged: Some(staged),
        len,
        done: false,
    })
}

/// An event of [`download_async`]'s (default scheduling flags, no timing): the side stream's
/// order after the `Gpu`'s stream, and each pooled buffer's "copied".
fn copy_event(gpu: &Gpu) -> Result<CudaEvent> {
    gpu.context()
        .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(Error::driver("creating an event"))
}

impl PendingDownload<'_> {
    /// Waits for the copy and returns what it read.
    pub(crate) fn wait(mut self) -> Result<Vec<u32>> {
        let staged = self.staged.as_ref().expect("the buffer stays until drop");
        staged
            .copied
            .synchronize()
            .map_err(Error::driver("waiting for a copy from the device"))?;
        // The buffer's own (blocking) event has completed with the copy: no sleep here.
        let read = staged
            .host
            .as_slice()
            .map_err(Error::driver("waiting for a copy from the device"))?[..self.len]
            .to_vec();
        self.done = true;
        Ok(read)
    }
}

impl Drop for PendingDownload<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.staged.take() {
            if !self.done {
                // Not waited for (an error between queueing and reading): the copy may still
                // read the source, which the caller frees next; wait for it here. An error
                // means the context is gone, and the copy with it.
                let _ = s.copied.synchronize();
            }
            // Back to the pool. A later copy into it is queued on the same side stream, after
            // this one, and its reader waits for the buffer's event as recorded after that copy.
            self.gpu
                .staging()
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
        }
    }
}

/// Allocates `len` elements and fills every byte with `byte`, always: for buffers whose initial
/// contents the work reads (zeroed accumulators, an error flag, routing's sentinels).
pub fn alloc_filled<T: DeviceRepr>(gpu: &Gpu, len: usize, byte: u8) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is fully initialised by the memset below, ordered before any later
    // use on the same stream.
    let mut buf = unsafe { gpu.stream().alloc::<T>(len) }
        .map_err(Error::driver("allocating device memory"))?;
    fill_bytes(gpu, &mut buf, byte)?;
    Ok(buf)
}

/// Allocates `len` elements for a kernel to write in full. With [`Gpu::poison_outputs`] on (the
/// test harness, debug builds) every byte is first set to 0xFF (NaN in bf16 and f32), so an
/// element a kernel fails to write is caught by the tests; otherwise the memory is left as the
/// allocator hands it over (no memset on the hot path: at a gpt-oss layer the fills were
/// ~0.5 GB of writes per forward + backward).
pub fn alloc_output<T: DeviceRepr>(gpu: &Gpu, len: usize) -> Result<CudaSlice<T>> {
    if gpu.poison_outputs() {
        return alloc_filled(gpu, len, 0xFF);
    }
    // SAFETY: the caller's kernel writes every element before anything reads it (the launch
    // contracts say so, and the tests check it with poisoned buffers); nothing is read from the
    // host before that work, which is ordered first on this stream.
    unsafe { gpu.stream().alloc::<T>(len) }.map_err(Error::driver("allocating device memory"))
}

/// Sets every byte of `buf` to `byte`, in stream order.
pub fn fill_bytes<T>(gpu: &Gpu, buf: &mut CudaSlice<T>, byte: u8) -> Result<()> {
    use cudarc::driver::DevicePtrMut;
    let bytes = buf.num_bytes();
    if bytes == 0 {
        return Ok(());
    }
    let (ptr, _sync) = buf.device_ptr_mut(gpu.stream());
    // SAFETY: `ptr` addresses `bytes` bytes of a live allocation owned by `buf`, and the memset
    // is ordered on the stream that owns it.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, gpu.stream().cu_stream()) }
        .map_err(Error::driver("filling device memory"))
}
