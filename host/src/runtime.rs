//! [`Runtime`]: what the ops run on — an opened [`Gpu`] and the tile-configuration [`Tuner`]
//! that chooses its GEMM configurations.
//!
//! The tuner lives here, above the device core, so that `device` does not depend on `tune`
//! (`tune` reads the device's limits). A `Runtime` dereferences to its [`Gpu`], so one value
//! serves both the ops (`ExpertLinear::forward(&rt, ..)`) and everything that only needs the
//! device (`Bf16Matrix::from_f32(&rt, ..)`, `DeviceRouting::from_host_ids(&rt, ..)`).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Mutex;

use crate::device::Gpu;
use crate::error::Result;
use crate::tune::{TuneMode, Tuner, default_cache_path};

/// An opened device with its tuner.
#[derive(Debug)]
pub struct Runtime {
    gpu: Gpu,
    tuner: Tuner,
    auto_history: AutoHistory,
}

/// `Strategy::Auto`'s last answer per problem (format, experts, N, K, routed rows): the guess
/// the next call on a fresh routing starts from. A guess of B lets the device decide while the
/// host queues B's forward; a guess of A reads the routing back first, since A needs it on the
/// host anyway and B's forward queued for nothing would cost a full grid of empty blocks.
#[derive(Debug, Default)]
pub(crate) struct AutoHistory {
    picked_a: Mutex<HashMap<[u64; 5], bool>>,
}

impl AutoHistory {
    /// Whether the last call on `key` picked Strategy A (`false` when none ran yet).
    pub(crate) fn last_picked_a(&self, key: [u64; 5]) -> bool {
        let map = self.picked_a.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&key).copied().unwrap_or(false)
    }

    /// Records the answer of a call on `key`.
    pub(crate) fn record(&self, key: [u64; 5], picked_a: bool) {
        let mut map = self.picked_a.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(key, picked_a);
    }
}

impl Runtime {
    /// A device with a given tuner (e.g. a memory-only one in `Default` mode for tests).
    pub fn new(gpu: Gpu, tuner: Tuner) -> Self {
        Self {
            gpu,
            tuner,
            auto_history: AutoHistory::default(),
        }
    }

    /// Opens device `ordinal` ([`Gpu::open`]) with the tuner the environment asks for
    /// ([`Tuner::from_env`]: `MXMOE_TUNE`, the cache file, `MXMOE_GEMM_CONFIG`).
    pub fn open(ordinal: usize) -> Result<Self> {
        Self::with_env_tuner(Gpu::open(ordinal)?)
    }

    /// Opens the first device.
    pub fn open_default() -> Result<Self> {
        Self::open(0)
    }

    /// Opens device `ordinal` on the caller's stream ([`Gpu::open_on_stream`]) with the tuner
    /// the environment asks for.
    ///
    /// # Safety
    ///
    /// As for [`Gpu::open_on_stream`].
    pub unsafe fn open_on_stream(ordinal: usize, cu_stream: usize) -> Result<Self> {
        // SAFETY: forwarded to the caller.
        Self::with_env_tuner(unsafe { Gpu::open_on_stream(ordinal, cu_stream) }?)
    }

    fn with_env_tuner(gpu: Gpu) -> Result<Self> {
        let tuner = Tuner::from_env(&gpu.limits().name)?;
        Ok(Self::new(gpu, tuner))
    }

    /// The same device and module on another borrowed stream ([`Gpu::on_stream`]), with a
    /// fresh tuner of the environment's mode and cache that keeps this one's forced
    /// configuration.
    ///
    /// # Safety
    ///
    /// As for [`Gpu::on_stream`].
    pub unsafe fn on_stream(&self, cu_stream: usize) -> Self {
        // SAFETY: forwarded to the caller.
        let gpu = unsafe { self.gpu.on_stream(cu_stream) };
        let tuner = Tuner::new(
            &gpu.limits().name,
            TuneMode::from_env(),
            default_cache_path(),
        )
        .with_forced(self.tuner.forced());
        Self::new(gpu, tuner)
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The tile-configuration tuner (force a row with [`Tuner::force`]).
    pub fn tuner(&self) -> &Tuner {
        &self.tuner
    }

    /// `Strategy::Auto`'s last answers.
    pub(crate) fn auto_history(&self) -> &AutoHistory {
        &self.auto_history
    }

    /// Replaces the tuner (e.g. to force a mode or a cache location).
    pub fn set_tuner(&mut self, tuner: Tuner) {
        self.tuner = tuner;
    }

    /// The device and the tuner, separated.
    pub fn into_parts(self) -> (Gpu, Tuner) {
        (self.gpu, self.tuner)
    }
}

impl Deref for Runtime {
    type Target = Gpu;
    fn deref(&self) -> &Gpu {
        &self.gpu
    }
}

#[cfg(test)]
mod tests {
    use super::AutoHistory;

    #[test]
    fn auto_history_guesses_b_until_a_call_picked_a_and_keeps_the_last_answer() {
        let h = AutoHistory::default();
        let (k1, k2) = ([0, 64, 256, 131072, 2048], [1, 64, 256, 131072, 2048]);
        assert!(!h.last_picked_a(k1));
        h.record(k1, true);
        assert!(h.last_picked_a(k1));
        assert!(!h.last_picked_a(k2), "another problem keeps its own answer");
        h.record(k1, false);
        assert!(!h.last_picked_a(k1));
    }
}
