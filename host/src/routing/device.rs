//! [`DeviceRouting`]: the routing kernels' outputs, resident on the device (see the parent
//! module for the conventions).

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaSlice, DeviceRepr};

use super::{DROPPED, Routing};
use crate::device::Gpu;
use crate::device::{download, upload};
use crate::error::{Error, Result};
use crate::kernels::gemm::RoutingView;
use crate::kernels::routing::{DeviceIds, RouteBuffers, route};

/// The routing of one MoE layer call, resident on the device. `Clone` shares the arrays (a
/// forward's saved state keeps the routing this way).
#[derive(Clone)]
pub struct DeviceRouting {
    tokens: usize,
    top_k: usize,
    num_experts: usize,
    bufs: Arc<RouteBuffers>,
    /// The offsets read back to the host, once per routing (shared by clones): `Auto` and
    /// Strategy A need them on the host, and every projection of a block shares the routing.
    host_offsets: Arc<OnceLock<Arc<[u32]>>>,
}

impl std::fmt::Debug for DeviceRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRouting")
            .field("tokens", &self.tokens)
            .field("top_k", &self.top_k)
            .field("num_experts", &self.num_experts)
            .finish()
    }
}

fn check_host_ids(ids: impl Iterator<Item = i64>, num_experts: usize) -> Result<()> {
    for (i, id) in ids.enumerate() {
        if id < DROPPED || id >= num_experts as i64 {
            return Err(Error::InvalidArgument {
                what: "expert ids",
                detail: format!(
                    "slot {i} has expert id {id}, outside [0, {num_experts}) (or -1 for a dropped slot)"
                ),
            });
        }
    }
    Ok(())
}

fn check_dims(len: usize, tokens: usize, top_k: usize, num_experts: usize) -> Result<()> {
    if top_k == 0 {
        return Err(Error::InvalidArgument {
            what: "top_k",
            detail: "must be at least 1".into(),
        });
    }
    if num_experts == 0 {
        return Err(Error::InvalidArgument {
            what: "num_experts",
            detail: "must be at least 1".into(),
        });
    }
    if len != tokens * top_k {
        return Err(Error::Shape {
            tensor: "expert ids",
            expected: format!("[{tokens}, {top_k}] ({} elements)", tokens * top_k),
            actual: format!("{len} elements"),
        });
    }
    Ok(())
}

impl DeviceRouting {
    /// Routes host-side ids `[tokens, top_k]` (row-major). Ids are validated on the host before
    /// upload, so bad ids are a typed error without a device round trip.
    pub fn from_host_ids(
        gpu: &Gpu,
        ids: &[i64],
        tokens: usize,
        top_k: usize,
        num_experts: usize,
    ) -> Result<Self> {
        Self::from_host(
            gpu,
            ids,
            DROPPED,
            |d| DeviceIds::I64(d),
            (tokens, top_k, num_experts),
        )
    }

    /// As [`from_host_ids`](Self::from_host_ids) for i32 ids.
    pub fn from_host_ids_i32(
        gpu: &Gpu,
        ids: &[i32],
        tokens: usize,
        top_k: usize,
        num_experts: usize,
    ) -> Result<Self> {
        let dropped = DROPPED as i32;
        Self::from_host(
            gpu,
            ids,
            dropped,
            |d| DeviceIds::I32(d),
            (tokens, top_k, num_experts),
        )
    }

    /// Both host paths: checks the ids, uploads them (one `dropped` id when there are none, so
    /// the buffer is valid) and routes them as `as_ids` presents the upload to the kernels.
    fn from_host<T: DeviceRepr + Copy + Into<i64>>(
        gpu: &Gpu,
        ids: &[T],
        dropped: T,
        as_ids: impl FnOnce(&CudaSlice<T>) -> DeviceIds<'_>,
        (tokens, top_k, num_experts): (usize, usize, usize),
    ) -> Result<Self> {
        check_dims(ids.len(), tokens, top_k, num_experts)?;
        check_host_ids(ids.iter().map(|&v| v.into()), num_experts)?;
        let placeholder = [dropped];
        let dev = upload(gpu, if ids.is_empty() { &placeholder } else { ids })?;
        Self::launch(gpu, as_ids(&dev), tokens, top_k, num_experts)
    }

    /// Routes ids already on the device. Out-of-range ids are detected by the kernels and
    /// reported by [`check`](Self::check) (a 4-byte read-back); until then they act as dropped.
    pub fn from_device_ids(
        gpu: &Gpu,
        ids: DeviceIds<'_>,
        tokens: usize,
        top_k: usize,
        num_experts: usize,
    ) -> Result<Self> {
        check_dims(ids.len(), tokens, top_k, num_experts)?;
        Self::launch(gpu, ids, tokens, top_k, num_experts)
    }

    fn launch(
        gpu: &Gpu,
        ids: DeviceIds<'_>,
        tokens: usize,
        top_k: usize,
        num_experts: usize,
    ) -> Result<Self> {
        let bufs = route(gpu, ids, tokens * top_k, num_experts)?;
        Ok(Self {
            tokens,
            top_k,
            num_experts,
            bufs: Arc::new(bufs),
            host_offsets: Arc::new(OnceLock::new()),
        })
    }

    /// Reads the kernels' error word: an error if any id was outside `[-1, E)`.
    pub fn check(&self, gpu: &Gpu) -> Result<()> {
        let flag = download(gpu, &self.bufs.error)?;
        if flag.first().copied().unwrap_or(0) != 0 {
            return Err(Error::InvalidArgument {
                what: "expert ids",
                detail: format!(
                    "an id is outside [0, {}) (or -1 for a dropped slot)",
                    self.num_experts
                ),
            });
        }
        Ok(())
    }

    /// Tokens `T`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Slots per token `k`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Routed rows `L = T·k` (including dropped slots).
    pub fn rows(&self) -> usize {
        self.tokens * self.top_k
    }

    /// u32 `[L]` bucket of each grouped row (E for dropped rows).
    pub fn sorted_expert_idxs(&self) -> &CudaSlice<u32> {
        &self.bufs.sorted_expert
    }

    /// u32 `[L]` flat slot of each grouped row.
    pub fn sorted_scattered_idxs(&self) -> &CudaSlice<u32> {
        &self.bufs.ssi
    }

    /// [`expert_offsets`](Self::expert_offsets) on the host: read back (one synchronisation)
    /// by the first call on this routing or any clone of it, then kept.
    pub fn host_offsets(&self, gpu: &Gpu) -> Result<Arc<[u32]>> {
        if let Some(o) = self.host_offsets.get() {
            return Ok(o.clone());
        }
        let read: Arc<[u32]> = download(gpu, &self.bufs.offsets)?.into();
        Ok(self.host_offsets.get_or_init(|| read).clone())
    }

    /// The offsets on the host if a call on this routing (or a clone) has read them already.
    pub(crate) fn cached_host_offsets(&self) -> Option<Arc<[u32]>> {
        self.host_offsets.get().cloned()
    }

    /// Keeps offsets read back another way (`Strategy::Auto`'s decision copies them with it):
    /// later calls on this routing and its clones find them without a read-back.
    pub(crate) fn remember_host_offsets(&self, offsets: Arc<[u32]>) -> Arc<[u32]> {
        self.host_offsets.get_or_init(|| offsets).clone()
    }

    /// u32 `[E]` inclusive row ends per expert.
    pub fn expert_offsets(&self) -> &CudaSlice<u32> {
        &self.bufs.offsets
    }

    pub(crate) fn view(&self) -> RoutingView<'_> {
        RoutingView::of_route(&self.bufs, self.rows(), self.num_experts)
    }

    /// Downloads the routing in the CPU reference's form (dropped rows omitted).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Routing> {
        let offsets = download(gpu, &self.bufs.offsets)?;
        let valid = offsets.last().copied().unwrap_or(0) as usize;
        let mut sorted = download(gpu, &self.bufs.sorted_expert)?;
        let mut ssi = download(gpu, &self.bufs.ssi)?;
        sorted.truncate(valid);
        ssi.truncate(valid);
        Ok(Routing {
            sorted_expert_idxs: sorted,
            sorted_scattered_idxs: ssi,
            expert_offsets: offsets,
            tokens: self.tokens,
            top_k: self.top_k,
        })
    }
}
