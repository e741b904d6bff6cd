//! Tile-configuration choice for the grouped GEMMs: candidate pruning with exact shared-memory
//! accounting, timing with CUDA events, and a per-key cache in memory and in a JSON file.
//!
//! - Candidates are the rows of `kernels_gpu::shared::tiles::GEMM_CONFIGS` (every row is a
//!   compiled entry point of the Hopper module; `cargo xtask ptx-report` checks each module
//!   holds exactly its rows). Each is dropped, with the reason counted, when the device's loaded
//!   module lacks it (the portable module has no `wgmma` rows, `PtxModule::has_config`), when
//!   it is invalid ([`TileConfig::validate`]), needs more
//!   shared memory than the live device's opt-in limit (computed by the same `smem_plan` the
//!   kernel carves its memory with), or more registers per block than an SM has.
//! - [`TuneMode::Tune`] times the survivors on the real inputs (one warm-up, median of three
//!   CUDA-event timings) and caches the winner per [`TuneKey`]; [`TuneMode::Default`] skips
//!   timing and uses [`default_config`], a rule measured on the H100 (`docs/BENCHMARKS.md`).
//! - The cache file is `$MXMOE_TUNE_CACHE`, else `$XDG_CACHE_HOME/mxmoe/tune.json`, else
//!   `$HOME/.cache/mxmoe/tune.json`. A corrupt or stale file (other table version or device) is
//!   ignored with a warning ([`Tuner::warnings`]); the library never prints.
//!
//! All configurations accumulate each output in the same k order (BK = 32, k16 steps in order),
//! so the choice changes speed only, never results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use kernels_gpu::shared::tiles::{
    BLayout, GEMM_CONFIG_NAMES, GEMM_CONFIGS, TileConfig, gemm_config_index, smem_plan,
};

use crate::device::DeviceLimits;
use crate::error::{Error, Result};

/// Version of the configuration table, stored in the cache file: any change to the table makes
/// older files stale.
pub fn table_version() -> String {
    GEMM_CONFIG_NAMES.join(",")
}

/// A configuration's name, e.g. `m64n128k32w2x2s4`: the suffix its row has in the one table
/// (`tiles::gemm_configs!`), which also names its entry points; `unlisted` for a configuration
/// that is not a row of [`GEMM_CONFIGS`].
pub fn config_name(c: &TileConfig) -> String {
    gemm_config_index(c)
        .map_or("unlisted", |i| GEMM_CONFIG_NAMES[i])
        .to_owned()
}

/// Whether to time candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuneMode {
    /// Use [`default_config`] (no timing, no synchronisation).
    Default,
    /// Time the surviving candidates once per key and cache the winner.
    Tune,
}

impl TuneMode {
    /// `MXMOE_TUNE=1|on|true` → `Tune`; anything else (or unset) → `Default`.
    pub fn from_env() -> Self {
        match std::env::var("MXMOE_TUNE").ok().as_deref() {
            Some("1" | "on" | "true") => TuneMode::Tune,
            _ => TuneMode::Default,
        }
    }
}

/// What a tuned choice is keyed on: the kernel family, the device, the problem dimensions and
/// the routed rows rounded up to a power of two.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TuneKey {
    /// Kernel family, e.g. `gemm_nk_mx`.
    pub kernel: &'static str,
    /// Compute capability.
    pub cc: (i32, i32),
    /// Experts the kernel sees.
    pub experts: usize,
    /// Reduction length.
    pub k: usize,
    /// Output width.
    pub n: usize,
    /// LoRA rank of the epilogue (0: none).
    pub rank: usize,
    /// Routed rows, bucketed by [`bucket_rows`].
    pub rows_bucket: usize,
}

impl TuneKey {
    /// The key as the cache file spells it.
    pub fn to_string_key(&self) -> String {
        format!(
            "{}/sm{}{}/e{}/k{}/n{}/r{}/m{}",
            self.kernel,
            self.cc.0,
            self.cc.1,
            self.experts,
            self.k,
            self.n,
            self.rank,
            self.rows_bucket
        )
    }
}

/// Rows rounded up to a power of two (at least 1), so nearby token counts share a choice.
pub fn bucket_rows(rows: usize) -> usize {
    rows.max(1).next_power_of_two()
}

/// How many candidates were dropped and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Rows the loaded PTX module does not have (`wgmma` rows on the portable module).
    pub absent: usize,
    /// Invalid configurations.
    pub invalid: usize,
    /// Over the device's opt-in shared memory per block.
    pub shared_memory: usize,
    /// More registers per block than the SM has.
    pub registers: usize,
}

/// Candidate rows of `GEMM_CONFIGS` that can launch on a device with `limits` (its loaded
/// module, shared memory and registers) for B layout
/// `layout` and padded rank `r_pad` (0 without LoRA). `registers(i)` gives the registers per
/// thread of candidate `i`'s entry point, when known.
pub fn prune(
    limits: &DeviceLimits,
    layout: BLayout,
    r_pad: u32,
    registers: impl Fn(usize) -> Option<u32>,
) -> (Vec<usize>, PruneReport) {
    let mut report = PruneReport::default();
    let mut keep = Vec::new();
    for (i, c) in GEMM_CONFIGS.iter().enumerate() {
        if !limits.module.has_config(c) {
            report.absent += 1;
        } else if c.validate().is_err() || (layout.is_fp4() && c.bk != 32 && c.bk != 64) {
            report.invalid += 1;
        } else if smem_plan(c, layout, r_pad).total_bytes as usize > limits.max_smem_per_block_optin
        {
            report.shared_memory += 1;
        } else if registers(i).is_some_and(|r| r * c.threads() > limits.regs_per_sm) {
            report.registers += 1;
        } else {
            keep.push(i);
        }
    }
    (keep, report)
}

/// The untuned choice, measured on the H100 (the tuner's picks, `docs/BENCHMARKS.md`, "Tile
/// rule"), by the average rows per expert and the B layout, restricted to `candidates` (falls
/// back to the first). `wg` rows are the Hopper `wgmma` kernels:
///
/// | rows per expert | `Nk` bf16 (forward) | `Kn` bf16 (dX) | `Nk` MXFP4 (forward) | `Kn` MXFP4 (dX) |
/// |---|---|---|---|---|
/// | ≥ 192 ([`WIDE_FP4_FROM_ROWS`]) | `m128n128k64wg2s4` | `m128n128k64wg2s4` | `m256n128k64wg2s3` | `m256n128k64wg2s3` |
/// | 96 – 191 | `m128n128k64wg2s4` | `m128n128k64wg2s4` | `m128n128k64wg2s4` | `m128n128k64wg2s4` |
/// | 48 – 95 | `m32n128k64wg2s4` | `m64n128k64w2x2s3` | `m128n128k64wg2s4` | `m64n128k64w2x2s3` |
/// | 16 – 47 | `m32n128k64wg2s4` | `m32n128k32w1x4s4` | `m64n128k64wg2s4` | `m32n128k64wg2s4` |
/// | < 16 | `m32n128k64wg2s4` | `m32n128k64wg2s4` | `m16n128k64w1x4s4` | `m16n128k64wg2s4` |
///
/// Below 96 rows per expert the candidates are within a few percent of each other. NVFP4 takes
/// MXFP4's rows (same stage shapes, a heavier decode; not tuned separately yet).
///
/// When that row is not a candidate, the first candidate of a fallback list for the rows per
/// expert is taken: from 96 rows `m128n128k64wg2s4` first (the 256-row row does not fit every
/// rank: its LoRA factors and output tile are twice the 128-row row's shared memory), then
/// `mma.sync` rows (the portable module has no `wg` rows; a 99 KB part drops the larger
/// tiles), from the tallest that the H100 measurements favour down to the smallest tiles, which
/// fit every supported GPU at every rank. The fallback is not measured on
/// the other GPUs (`docs/PORTABILITY.md`); `MXMOE_TUNE=1` times the candidates there.
///
/// | rows per expert | fallback, in order |
/// |---|---|
/// | ≥ 96 | `m128n128k64wg2s4`, `m128n128k32w2x4s3`, `m64n128k64w2x2s3`, `m64n128k32w2x2s3`, then as 16 – 47 |
/// | 48 – 95 | `m64n128k64w2x2s3`, `m64n128k32w2x2s3`, then as 16 – 47 |
/// | 16 – 47 | `m32n128k64w1x4s3`, `m32n128k32w1x4s4`, `m16n128k32w1x4s4` |
/// | < 16 | `m16n128k64w1x4s4`, `m16n128k32w1x4s4`, `m32n128k32w1x4s4` |
pub fn default_config(layout: BLayout, rows: usize, experts: usize, candidates: &[usize]) -> usize {
    let per_expert = rows / experts.max(1);
    let name = match (layout, per_expert) {
        (l, WIDE_FP4_FROM_ROWS..) if l.is_fp4() => "m256n128k64wg2s3",
        (_, 96..) => "m128n128k64wg2s4",
        (BLayout::NkBf16 | BLayout::Strided, _) => "m32n128k64wg2s4",
        (BLayout::NkMxfp4 | BLayout::NkNvfp4, 48..) => "m128n128k64wg2s4",
        (BLayout::KnBf16 | BLayout::KnMxfp4 | BLayout::KnNvfp4, 48..) => "m64n128k64w2x2s3",
        (BLayout::KnBf16, 16..) => "m32n128k32w1x4s4",
        (BLayout::KnBf16, _) => "m32n128k64wg2s4",
        (BLayout::NkMxfp4 | BLayout::NkNvfp4, 16..) => "m64n128k64wg2s4",
        (BLayout::NkMxfp4 | BLayout::NkNvfp4, _) => "m16n128k64w1x4s4",
        (BLayout::KnMxfp4 | BLayout::KnNvfp4, 16..) => "m32n128k64wg2s4",
        (BLayout::KnMxfp4 | BLayout::KnNvfp4, _) => "m16n128k64wg2s4",
    };
    let small: &[&str] = &["m32n128k64w1x4s3", "m32n128k32w1x4s4", "m16n128k32w1x4s4"];
    let fallback: &[&str] = match per_expert {
        // The 128-row `wgmma` row first: the next choice where the 256-row row's shared memory
        // (LoRA factors and output tile twice the 128-row row's) does not fit the rank.
        96.. => &[
            "m128n128k64wg2s4",
            "m128n128k32w2x4s3",
            "m64n128k64w2x2s3",
            "m64n128k32w2x2s3",
        ],
        48.. => &["m64n128k64w2x2s3", "m64n128k32w2x2s3"],
        16.. => &[],
        _ => &["m16n128k64w1x4s4", "m16n128k32w1x4s4", "m32n128k32w1x4s4"],
    };
    std::iter::once(name)
        .chain(fallback.iter().copied())
        .chain(small.iter().copied())
        .filter_map(|n| GEMM_CONFIGS.iter().position(|c| config_name(c) == n))
        .find(|i| candidates.contains(i))
        .unwrap_or_else(|| candidates.first().copied().unwrap_or(0))
}

/// Average rows per expert from which the 4-bit layouts (MXFP4 and NVFP4, forward and dX)
/// default to the 256-row `wgmma` row: each decoded weight tile then feeds twice the MMA work.
/// H100 (`docs/PERF.md`, "256-row tiles for the 4-bit layouts"): faster at 256 and 512 rows per
/// expert, slower at 128 (half-empty tiles).
pub const WIDE_FP4_FROM_ROWS: usize = 192;

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    version: String,
    device: String,
    entries: BTreeMap<String, String>,
}

/// The per-device tuner: mode, cache, warnings.
pub struct Tuner {
    mode: TuneMode,
    path: Option<PathBuf>,
    device: String,
    cache: Mutex<BTreeMap<String, usize>>,
    warnings: Mutex<Vec<String>>,
    loaded: Mutex<bool>,
    /// The forced row of `GEMM_CONFIGS`, [`NOT_FORCED`] when none.
    forced: AtomicUsize,
}

/// The value of `Tuner::forced` when no configuration is forced.
const NOT_FORCED: usize = usize::MAX;

impl std::fmt::Debug for Tuner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tuner")
            .field("mode", &self.mode)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The row of `GEMM_CONFIGS` that `MXMOE_GEMM_CONFIG=<index>` forces, if the variable is set; a
/// value that is not an index of the table is [`Error::InvalidArgument`].
pub fn forced_from_env() -> Result<Option<usize>> {
    let Ok(v) = std::env::var("MXMOE_GEMM_CONFIG") else {
        return Ok(None);
    };
    match v.trim().parse::<usize>() {
        Ok(i) if i < GEMM_CONFIGS.len() => Ok(Some(i)),
        _ => Err(Error::InvalidArgument {
            what: "MXMOE_GEMM_CONFIG",
            detail: format!(
                "{v:?} is not an index of the tile configuration table (0..{})",
                GEMM_CONFIGS.len()
            ),
        }),
    }
}

/// The default cache path (see the module docs), or `None` when no home is known.
pub fn default_cache_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MXMOE_TUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("mxmoe").join("tune.json"))
}

impl Tuner {
    /// A tuner for device `device` with `mode`, caching in `path` (`None`: memory only).
    pub fn new(device: &str, mode: TuneMode, path: Option<PathBuf>) -> Self {
        Self {
            mode,
            path,
            device: device.to_string(),
            cache: Mutex::new(BTreeMap::new()),
            warnings: Mutex::new(Vec::new()),
            loaded: Mutex::new(false),
            forced: AtomicUsize::new(NOT_FORCED),
        }
    }

    /// The tuner the environment asks for: mode from `MXMOE_TUNE`, the cache at
    /// [`default_cache_path`], and `MXMOE_GEMM_CONFIG=<index>` forcing one row of `GEMM_CONFIGS`
    /// for every GEMM (read once, here; a value that is not an index of the table is an error).
    pub fn from_env(device: &str) -> Result<Self> {
        Ok(
            Self::new(device, TuneMode::from_env(), default_cache_path())
                .with_forced(forced_from_env()?),
        )
    }

    /// The same tuner, forcing row `forced` of `GEMM_CONFIGS` (when `Some`) for every GEMM:
    /// neither the cache nor timing nor the default rule is consulted, and a GEMM the forced
    /// configuration cannot run (pruned for the device, layout or rank) fails with
    /// [`Error::InvalidArgument`] instead of silently running another one.
    pub fn with_forced(self, forced: Option<usize>) -> Self {
        self.force(forced);
        self
    }

    /// Forces row `forced` of `GEMM_CONFIGS` from now on (`None`: back to the normal choice), as
    /// [`with_forced`](Self::with_forced) does, on a tuner in use (e.g. to run every row in turn).
    pub fn force(&self, forced: Option<usize>) {
        self.forced
            .store(forced.unwrap_or(NOT_FORCED), Ordering::Relaxed);
    }

    /// The forced configuration, if any.
    pub fn forced(&self) -> Option<usize> {
        Some(self.forced.load(Ordering::Relaxed)).filter(|&i| i != NOT_FORCED)
    }

    /// The mode.
    pub fn mode(&self) -> TuneMode {
        self.mode
    }

    /// Warnings collected so far (ignored cache files, failed saves), oldest first.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn warn(&self, w: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(w);
    }

    /// Loads the cache file once; a corrupt or stale file is ignored with a warning.
    fn load(&self) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded {
            return;
        }
        *loaded = true;
        let Some(path) = &self.path else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        match serde_json::from_str::<CacheFile>(&text) {
            Ok(f) if f.version == table_version() && f.device == self.device => {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                for (k, name) in f.entries {
                    match GEMM_CONFIGS.iter().position(|c| config_name(c) == name) {
                        Some(i) => {
                            cache.insert(k, i);
                        }
                        None => self.warn(format!(
                            "tuning cache {}: unknown configuration {name} ignored",
                            path.display()
                        )),
                    }
                }
            }
            Ok(_) => self.warn(format!(
                "tuning cache {} is for another device or configuration table; ignored",
                path.display()
            )),
            Err(e) => self.warn(format!(
                "tuning cache {} is corrupt ({e}); ignored",
                path.display()
            )),
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let entries = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, &i)| (k.clone(), config_name(&GEMM_CONFIGS[i])))
            .collect();
        let file = CacheFile {
            version: table_version(),
            device: self.device.clone(),
            entries,
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            self.warn(format!(
                "could not write the tuning cache {}: {e}",
                path.display()
            ));
        }
    }

    /// The cached choice for `key`, if any.
    pub fn cached(&self, key: &TuneKey) -> Option<usize> {
        self.load();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.to_string_key())
            .copied()
    }

    /// Chooses a configuration among `candidates` for `key`: the cached one, else (in `Tune`
    /// mode) the fastest by `time(i)` (milliseconds; errors abort) provided it beats `fallback`
    /// by more than the timing noise (3 %), else `fallback`. So a tuned choice is never a
    /// measurably slower one than the default.
    pub fn choose(
        &self,
        key: &TuneKey,
        candidates: &[usize],
        fallback: usize,
        mut time: impl FnMut(usize) -> Result<f32>,
    ) -> Result<usize> {
        if let Some(i) = self.cached(key).filter(|i| candidates.contains(i)) {
            return Ok(i);
        }
        if self.mode == TuneMode::Default || candidates.len() <= 1 {
            return Ok(fallback);
        }
        let base = if candidates.contains(&fallback) {
            time(fallback)?
        } else {
            f32::INFINITY
        };
        let mut best = (base, fallback);
        for &i in candidates.iter().filter(|&&i| i != fallback) {
            let t = time(i)?;
            if t < best.0 && t < 0.97 * base {
                best = (t, i);
            }
        }
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string_key(), best.1);
        self.save();
        Ok(best.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::PtxModule;

    #[test]
    fn config_names_are_the_table_suffixes() {
        for (i, c) in GEMM_CONFIGS.iter().enumerate() {
            assert_eq!(config_name(c), GEMM_CONFIG_NAMES[i]);
            assert_eq!(
                kernels_gpu::shared::names::GEMM_NK[i],
                format!("mxmoe_gemm_nk_{}", config_name(c))
            );
        }
        assert_eq!(
            table_version().split(',').collect::<Vec<_>>(),
            GEMM_CONFIG_NAMES
        );
        // The first rows, as cache files written before the table was generated spell them.
        assert!(table_version().starts_with("m128n128k32w2x4s3,m64n128k32w2x2s3,"));
        let off_table = TileConfig {
            stages: 2,
            ..GEMM_CONFIGS[0]
        };
        assert_eq!(config_name(&off_table), "unlisted");
    }

    fn limits(smem: usize) -> DeviceLimits {
        DeviceLimits {
            name: "test".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            max_smem_per_block_optin: smem,
            max_smem_per_sm: smem + 1024,
            regs_per_sm: 65536,
            l2_bytes: 50 << 20,
            total_mem_bytes: 80 << 30,
            module: PtxModule::Hopper,
        }
    }

    /// A device of the portable module with `smem` opt-in bytes (A100: 166912, sm_86/89/120:
    /// 101376, sm_90/100: 232448).
    fn portable(smem: usize) -> DeviceLimits {
        DeviceLimits {
            module: PtxModule::Portable,
            compute_capability: (8, 0),
            ..limits(smem)
        }
    }

    #[test]
    fn rows_absent_from_the_loaded_module_are_never_candidates() {
        for smem in [166_912, 101_376, 232_448] {
            for layout in kernels_gpu::shared::names::GEMM_WEIGHT_LAYOUTS {
                for r_pad in [0, 16, 64, 128] {
                    let (keep, report) = prune(&portable(smem), layout, r_pad, |_| None);
                    assert!(keep.iter().all(|&i| !GEMM_CONFIGS[i].wgmma));
                    assert_eq!(
                        report.absent,
                        GEMM_CONFIGS.iter().filter(|c| c.wgmma).count()
                    );
                    assert!(!keep.is_empty(), "{smem} {layout:?} {r_pad}");
                }
            }
        }
        let (keep, report) = prune(&limits(232_448), BLayout::NkBf16, 0, |_| None);
        assert_eq!(report.absent, 0);
        assert!(keep.iter().any(|&i| GEMM_CONFIGS[i].wgmma));
    }

    #[test]
    fn the_portable_rule_picks_a_fitting_mma_sync_row_of_the_right_height() {
        // Every supported limit, layout, rank and load: the pick is a candidate (so present in
        // the portable module and within the part's shared memory), at most four times as tall
        // as an expert's rows (or 32), and never shrinks as the rows grow.
        for smem in [166_912, 101_376, 232_448] {
            let limits = portable(smem);
            for layout in kernels_gpu::shared::names::GEMM_WEIGHT_LAYOUTS {
                for r_pad in [0, 16, 32, 64, 128] {
                    let (candidates, _) = prune(&limits, layout, r_pad, |_| None);
                    let mut last_bm = 0;
                    for per_expert in [1usize, 8, 15, 16, 47, 48, 95, 96, 4096] {
                        let i = default_config(layout, per_expert * 64, 64, &candidates);
                        let c = &GEMM_CONFIGS[i];
                        assert!(candidates.contains(&i), "{smem} {layout:?} r {r_pad}");
                        assert!(!c.wgmma);
                        assert!(
                            c.bm as usize <= (4 * per_expert).max(32),
                            "{smem} {layout:?} r {r_pad}: {c:?} for {per_expert} rows"
                        );
                        assert!(c.bm >= last_bm, "{smem} {layout:?} r {r_pad}");
                        last_bm = c.bm;
                    }
                    if smem >= 166_912 {
                        assert_eq!(last_bm, 128, "{smem} {layout:?} r {r_pad}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_forced_row_can_be_set_and_cleared_on_a_tuner_in_use() {
        let t = Tuner::new("test", TuneMode::Default, None);
        assert_eq!(t.forced(), None);
        let t = t.with_forced(Some(3));
        assert_eq!(t.forced(), Some(3));
        t.force(None);
        assert_eq!(t.forced(), None);
        t.force(Some(0));
        assert_eq!(t.forced(), Some(0));
    }

    #[test]
    fn smem_accounting_is_the_kernels_plan() {
        // The tuner's number is `smem_plan(..).total_bytes`, the same value the launch passes and
        // the kernel carves; check the plan covers every region for every table row.
        for c in GEMM_CONFIGS {
            for layout in kernels_gpu::shared::names::GEMM_WEIGHT_LAYOUTS {
                for r_pad in [0, 16, 64, 128] {
                    let p = smem_plan(c, layout, r_pad);
                    let main = c.stages * (p.a_stage_bytes + p.b_stage_bytes);
                    assert!(
                        p.total_bytes >= main.max(p.epilogue_bytes) + 8 * c.bm,
                        "{c:?} {layout:?} {r_pad}"
                    );
                    if c.wgmma {
                        // The pipeline's mbarriers follow the row arrays: full and empty per
                        // stage, then "LoRA ready" and "epilogue done".
                        assert!(p.barriers_offset >= p.rows_offset + 8 * c.bm);
                        assert_eq!(p.total_bytes, p.barriers_offset + 16 * c.stages + 16);
                    } else {
                        assert_eq!(p.total_bytes, p.rows_offset + 8 * c.bm);
                    }
                }
            }
        }
    }

    #[test]
    fn pruning_follows_the_device_limit() {
        let all = |l: &DeviceLimits, layout, r| prune(l, layout, r, |_| None);
        // H100/H200 (227 KiB opt-in; the sm_90a module loads on nothing else) fit every row at
        // rank 64, and at rank 128 every row but the 256-row one (its LoRA factors and output
        // tile take twice the 128-row row's shared memory).
        let (keep, report) = all(&limits(232_448), BLayout::KnMxfp4, 64);
        assert_eq!(keep.len(), GEMM_CONFIGS.len());
        assert_eq!(report, PruneReport::default());
        let (keep, report) = all(&limits(232_448), BLayout::KnMxfp4, 128);
        for (i, c) in GEMM_CONFIGS.iter().enumerate() {
            assert_eq!(keep.contains(&i), c.bm != 256, "{c:?}");
        }
        assert_eq!(report.shared_memory, GEMM_CONFIGS.len() - keep.len());
        // A 99 KiB part drops the rows whose plan exceeds it, and counts them.
        let small = limits(101_376);
        let (keep, report) = all(&small, BLayout::NkBf16, 128);
        for (i, c) in GEMM_CONFIGS.iter().enumerate() {
            let fits = smem_plan(c, BLayout::NkBf16, 128).total_bytes <= 101_376;
            assert_eq!(keep.contains(&i), fits, "{c:?}");
        }
        assert_eq!(report.shared_memory, GEMM_CONFIGS.len() - keep.len());
        // A tiny limit drops everything.
        let (keep, report) = all(&limits(1024), BLayout::NkBf16, 0);
        assert!(keep.is_empty());
        assert_eq!(report.shared_memory, GEMM_CONFIGS.len());
        // Register pressure: 255 registers per thread on a part with 16K registers per SM.
        let few_regs = DeviceLimits {
            regs_per_sm: 16_384,
            ..limits(232_448)
        };
        let (keep, report) = prune(&few_regs, BLayout::NkBf16, 0, |_| Some(255));
        assert!(keep.is_empty() && report.registers == GEMM_CONFIGS.len());
    }

    #[test]
    fn rows_are_bucketed_to_powers_of_two() {
        assert_eq!(bucket_rows(0), 1);
        assert_eq!(bucket_rows(1), 1);
        assert_eq!(bucket_rows(1000), 1024);
        assert_eq!(bucket_rows(1024), 1024);
        assert_eq!(bucket_rows(1025), 2048);
    }

    fn key() -> TuneKey {
        TuneKey {
            kernel: "gemm_nk",
            cc: (9, 0),
            experts: 128,
            k: 2048,
            n: 1024,
            rank: 16,
            rows_bucket: 32768,
        }
    }

    #[test]
    fn tuned_choice_round_trips_through_the_cache_file() {
        let dir = std::env::temp_dir().join(format!("mxmoe-tune-test-{}", std::process::id()));
        let path = dir.join("tune.json");
        let _ = std::fs::remove_dir_all(&dir);
        let t = Tuner::new("dev", TuneMode::Tune, Some(path.clone()));
        let cands: Vec<usize> = (0..GEMM_CONFIGS.len()).collect();
        // Candidate 3 is fastest.
        let chosen = t
            .choose(&key(), &cands, 0, |i| Ok(if i == 3 { 1.0 } else { 2.0 }))
            .unwrap();
        assert_eq!(chosen, 3);
        assert!(path.is_file());
        // A new tuner reads it back without timing.
        let t2 = Tuner::new("dev", TuneMode::Tune, Some(path.clone()));
        let again = t2
            .choose(&key(), &cands, 0, |_| panic!("must not time a cached key"))
            .unwrap();
        assert_eq!(again, 3);
        assert!(t2.warnings().is_empty());
        // Another device's file is stale: ignored with a warning, and Default mode falls back.
        let t3 = Tuner::new("other", TuneMode::Default, Some(path.clone()));
        assert_eq!(
            t3.choose(&key(), &cands, 1, |_| panic!("no timing in Default mode"))
                .unwrap(),
            1
        );
        assert!(t3.warnings().iter().any(|w| w.contains("another device")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_cache_is_ignored_with_a_warning() {
        let dir = std::env::temp_dir().join(format!("mxmoe-tune-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tune.json");
        std::fs::write(&path, "{ not json").unwrap();
        let t = Tuner::new("dev", TuneMode::Tune, Some(path.clone()));
        let cands = [0usize, 1];
        let chosen = t.choose(&key(), &cands, 0, |i| Ok(i as f32)).unwrap();
        assert_eq!(chosen, 0);
        assert!(t.warnings().iter().any(|w| w.contains("corrupt")));
        // The file was rewritten with a valid cache.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_rule_picks_a_runnable_candidate_whose_tile_fits_the_rows() {
        // Behaviour, not the rule's table: for every layout, rank and load, the pick is one of
        // the candidates an H100 keeps at that rank; its tile is at most four times as tall as
        // an expert's rows (or 32), grows with the rows per expert, and ends at the tallest
        // tile that fits: 256 rows for the 4-bit layouts up to the rank where that row's
        // shared memory runs out, else 128.
        let h100 = limits(232_448);
        let all: Vec<usize> = (0..GEMM_CONFIGS.len()).collect();
        for layout in kernels_gpu::shared::names::GEMM_WEIGHT_LAYOUTS {
            for r_pad in [0, 16, 64, 128] {
                let (cands, _) = prune(&h100, layout, r_pad, |_| None);
                let wide_fits = GEMM_CONFIGS
                    .iter()
                    .enumerate()
                    .any(|(j, c)| c.bm == 256 && cands.contains(&j));
                let mut last_bm = 0;
                for per_expert in [1usize, 3, 8, 15, 16, 31, 47, 48, 64, 95, 96, 200, 4096] {
                    let experts = 64;
                    let i = default_config(layout, per_expert * experts, experts, &cands);
                    let c = &GEMM_CONFIGS[i];
                    assert!(
                        cands.contains(&i),
                        "{layout:?} {per_expert}: {c:?} pruned at r {r_pad}"
                    );
                    assert!(
                        c.bm as usize <= (4 * per_expert).max(32),
                        "{layout:?}: {c:?} for {per_expert} rows per expert"
                    );
                    assert!(
                        c.bm >= last_bm,
                        "{layout:?}: tile shrinks at {per_expert} rows"
                    );
                    last_bm = c.bm;
                    // The preferred row unavailable: another candidate, never an absent one.
                    let others: Vec<usize> = all.iter().copied().filter(|&j| j != i).collect();
                    let j = default_config(layout, per_expert * experts, experts, &others);
                    assert!(others.contains(&j));
                }
                let tallest = if layout.is_fp4() && wide_fits {
                    256
                } else {
                    128
                };
                assert_eq!(
                    last_bm, tallest,
                    "{layout:?} r {r_pad}: many rows per expert take the tallest tile"
                );
            }
        }
    }
}
