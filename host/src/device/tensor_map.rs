//! TMA tensor maps (`CUtensorMap`) for the `wgmma` kernels' weight tiles
//! ([`GemmParams::b_tmap_addr`](kernels_gpu::shared::params::GemmParams::b_tmap_addr)) and
//! activation rows ([`GemmParams::a_tmap_addr`](kernels_gpu::shared::params::GemmParams::a_tmap_addr)).
//!
//! A map is a pure function of its [`TileMap`] (tensor address, sizes, strides, box, layout), so
//! each [`Gpu`] keeps the maps it has built in device memory by value: one
//! `cuTensorMapEncodeTiled` (host only) and one 128-byte copy the first time a weight tensor is
//! used with a box, none after. A map outlives nothing it describes: a freed tensor whose address
//! comes back gets the same map, which is then right again. The copy is ordered on the `Gpu`'s
//! stream before the kernels that read it, and the kernels fence it before use
//! (`fence.proxy.tensormap::generic.acquire`), as the CUDA Programming Guide asks of maps in
//! global memory written by the host.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::{CudaSlice, DevicePtr, sys};

use super::{Gpu, upload};
use crate::error::{Error, Result};

/// The environment variable that sets [`Gpu::tma`] and [`Gpu::tma_activations`] for every
/// `Gpu` opened afterwards (read once per open): `0` or `off` turns both TMA paths off,
/// `weights` keeps only the weight tiles', `1`, `on` or unset leaves both on.
pub const TMA_ENV: &str = "MXMOE_TMA";

/// `(Gpu::tma, Gpu::tma_activations)`'s initial values from `MXMOE_TMA`'s value (`None` or
/// empty: unset).
/// Errors: [`Error::InvalidArgument`] naming the variable for any other value.
pub(crate) fn tma_from_env(value: Option<&str>) -> Result<(bool, bool)> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok((true, true)),
        Some("1" | "on") => Ok((true, true)),
        Some("weights") => Ok((true, false)),
        Some("0" | "off") => Ok((false, false)),
        Some(v) => Err(Error::InvalidArgument {
            what: TMA_ENV,
            detail: format!(
                "{v:?}: use 0 or off (cp.async tiles), weights (TMA for the weight tiles only), \
                 1 or on (TMA for the weight tiles and grouped activation rows)"
            ),
        }),
    }
}

/// Maps a [`Gpu`] keeps before it drops them all and starts again (each holds 128 bytes of
/// device memory; a training run uses a few per weight tensor).
const MAX_MAPS: usize = 256;

/// Element type of a tensor map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum MapElem {
    /// bf16 weights.
    Bf16,
    /// Packed 4-bit codes, two per byte.
    U8,
}

impl MapElem {
    fn bytes(self) -> u64 {
        match self {
            MapElem::Bf16 => 2,
            MapElem::U8 => 1,
        }
    }
}

/// A 3-dimensional tiled tensor map, innermost dimension first; elements of a box outside the
/// tensor read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TileMap {
    /// Global address of element (0, 0, 0).
    pub addr: u64,
    pub elem: MapElem,
    /// Elements along each dimension.
    pub dims: [u64; 3],
    /// Bytes between consecutive indices of dimensions 1 and 2 (dimension 0 is contiguous).
    pub strides: [u64; 2],
    /// Elements of one box (one copy) along each dimension.
    pub boxes: [u32; 3],
    /// The 128-byte swizzle (the `wgmma` descriptors' layout: 16-byte chunk `c` of box row `r`
    /// at chunk `c ^ (r % 8)`); else the box is stored row-major without gaps.
    pub swizzle_128: bool,
}

impl TileMap {
    /// Whether `cuTensorMapEncodeTiled` accepts this map (CUDA Driver API, "Tensor Map Object
    /// Management"): a 16-byte aligned address, sizes from 1 to 2^32, strides that are multiples
    /// of 16 bytes below 2^40, boxes of 1 to 256 elements whose inner extent is a multiple of 16
    /// bytes (at most 128 with the 128-byte swizzle). A weight tensor that is not encodable (a
    /// view at an odd offset, a stride that is not a multiple of 16 bytes) keeps the `cp.async`
    /// path.
    pub(crate) fn encodable(&self) -> bool {
        let inner = self.boxes[0] as u64 * self.elem.bytes();
        self.addr.is_multiple_of(16)
            && self.dims.iter().all(|&d| (1..=1 << 32).contains(&d))
            && self
                .strides
                .iter()
                .all(|&s| s.is_multiple_of(16) && s < 1 << 40)
            && self.boxes.iter().all(|&b| (1..=256).contains(&b))
            && inner.is_multiple_of(16)
            && (!self.swizzle_128 || inner <= 128)
    }

    /// `cuTensorMapEncodeTiled` (host only; no context needed beyond the loaded driver).
    fn encode(&self) -> Result<sys::CUtensorMap> {
        if !self.encodable() {
            return Err(Error::InvalidArgument {
                what: "tensor map",
                detail: format!("{self:?} is not encodable"),
            });
        }
        let data_type = match self.elem {
            MapElem::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            MapElem::U8 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        };
        let swizzle = if self.swizzle_128 {
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
        } else {
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
        };
        let element_strides = [1u32; 3];
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: `map` is a writable, 64-byte aligned `CUtensorMap` (its type's alignment); the
        // arrays hold `rank` = 3 sizes and boxes and `rank − 1` = 2 strides, as the API reads;
        // the address is only recorded, never dereferenced on the host.
        let status = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                data_type,
                3,
                self.addr as *mut std::ffi::c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.boxes.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::InvalidArgument {
                what: "tensor map",
                detail: format!("cuTensorMapEncodeTiled rejected {self:?}: {status:?}"),
            });
        }
        Ok(map)
    }
}

/// The maps one [`Gpu`] has built, in device memory.
#[derive(Default)]
pub(crate) struct TensorMaps {
    maps: Mutex<HashMap<TileMap, CudaSlice<u8>>>,
}

impl Gpu {
    /// Device address of `map`'s 128-byte `CUtensorMap` (256-byte aligned), built and copied on
    /// the first request (ordered on this `Gpu`'s stream before any later launch).
    /// Errors: [`Error::InvalidArgument`] if the map is not [`TileMap::encodable`]; driver errors.
    pub(crate) fn tensor_map(&self, map: &TileMap) -> Result<u64> {
        let mut maps = self
            .tensor_maps
            .maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(buf) = maps.get(map) {
            return Ok(buf.device_ptr(self.stream()).0);
        }
        let encoded = map.encode()?;
        let bytes: Vec<u8> = encoded
            .opaque
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let buf = upload(self, &bytes)?;
        if maps.len() >= MAX_MAPS {
            // Freed in stream order: every kernel launched with one of them runs first.
            maps.clear();
        }
        let at = buf.device_ptr(self.stream()).0;
        maps.insert(*map, buf);
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_weights() -> TileMap {
        TileMap {
            addr: 1 << 20,
            elem: MapElem::Bf16,
            dims: [2880, 5760, 32],
            strides: [2880 * 2, 2880 * 5760 * 2],
            boxes: [64, 64, 1],
            swizzle_128: true,
        }
    }

    #[test]
    fn mxmoe_tma_takes_on_weights_and_off_and_rejects_the_rest() {
        for (v, want) in [
            (None, (true, true)),
            (Some(""), (true, true)),
            (Some(" on "), (true, true)),
            (Some("1"), (true, true)),
            (Some("weights"), (true, false)),
            (Some("0"), (false, false)),
            (Some("off"), (false, false)),
        ] {
            assert_eq!(tma_from_env(v).unwrap(), want, "{v:?}");
        }
        match tma_from_env(Some("no")) {
            Err(Error::InvalidArgument { what, detail }) => {
                assert_eq!(what, TMA_ENV);
                assert!(
                    detail.contains("\"no\"") && detail.contains("off"),
                    "{detail}"
                );
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn encodable_follows_the_driver_rules() {
        let ok = bf16_weights();
        let packed = TileMap {
            elem: MapElem::U8,
            dims: [1440, 5760, 32],
            strides: [1440, 1440 * 5760],
            boxes: [32, 128, 1],
            swizzle_128: false,
            ..ok
        };
        let cases = [
            (ok, true, "bf16 [E, N, K], 64 × 64 boxes, 128-byte swizzle"),
            (
                TileMap {
                    addr: ok.addr + 2,
                    ..ok
                },
                false,
                "a view one element in: address not 16-byte aligned",
            ),
            (
                TileMap {
                    strides: [2884 * 2, ok.strides[1]],
                    ..ok
                },
                false,
                "row stride 5768 B: not a multiple of 16",
            ),
            (
                TileMap {
                    boxes: [128, 64, 1],
                    ..ok
                },
                false,
                "256-byte box rows under the 128-byte swizzle",
            ),
            (
                TileMap {
                    boxes: [128, 64, 1],
                    swizzle_128: false,
                    ..ok
                },
                true,
                "256-byte box rows without swizzle",
            ),
            (
                TileMap {
                    boxes: [64, 257, 1],
                    ..ok
                },
                false,
                "a box of 257 rows",
            ),
            (
                TileMap {
                    dims: [2880, 0, 32],
                    ..ok
                },
                false,
                "an empty dimension",
            ),
            (packed, true, "packed codes, 32-byte × 128-row boxes"),
            (
                TileMap {
                    strides: [1448, 1448 * 5760],
                    ..packed
                },
                false,
                "K = 2896: 1448-byte rows",
            ),
        ];
        for (map, want, what) in cases {
            assert_eq!(map.encodable(), want, "{what}: {map:?}");
        }
    }
}
