"""mxmoe: ScatterMoE-LoRA over MXFP4 / bf16 expert weights, from Python.

The kernels are written in Rust and embedded as PTX for sm_90a (H100/H200); the CUDA driver is
loaded at run time, so neither installing nor importing this package needs a CUDA toolkit.

Without torch (this module): the bit-exact torchao MXFP4 quantizer and dequantizer on bytes,
mxmoe's safetensors reader, and the error types.

With torch (imported lazily on first use of one of these names; see ``mxmoe.autograd``):
``quantize``/``dequantize`` on tensors, the autograd Functions ``ExpertLinearFunction`` and
``MoeBlockFunction``, the functional ``expert_linear``/``moe_block`` and the modules
``MxExpertLinear``/``MxMoeBlock`` (MXFP4 experts as buffers, LoRA A/B as parameters).
"""

from __future__ import annotations

import os
from typing import Dict, Tuple, Union

from . import _native
from ._native import MxmoeError, NoDeviceError, device_count, driver_present

__version__ = _native.__version__

__all__ = [
    "MxmoeError",
    "NoDeviceError",
    "driver_present",
    "device_count",
    "quantize_mxfp4_bytes",
    "dequantize_mxfp4_bytes",
    "read_safetensors",
    # lazily from mxmoe.autograd (need torch):
    "quantize",
    "dequantize",
    "check_scales",
    "ExpertLinearFunction",
    "MoeBlockFunction",
    "expert_linear",
    "moe_block",
    "MxExpertLinear",
    "MxMoeBlock",
    "route_topk",
]


def quantize_mxfp4_bytes(
    data: bytes, experts: int, n: int, k: int, dtype: str = "f32"
) -> Tuple[bytes, bytes]:
    """Quantizes ``[experts, n, k]`` little-endian ``f32`` or ``bf16`` values to MXFP4.

    Returns ``(packed, scales)``: ``[E, N, K/2]`` E2M1 code pairs (even k in the low nibble) and
    ``[E, N, K/32]`` E8M0 scale bytes, bit-identical to torchao 0.17.0
    ``MXTensor.to_mx(w, float4_e2m1fn_x2, block_size=32)`` (FLOOR). Raises ``MxmoeError``.
    """
    return _native.quantize_mxfp4_bytes(bytes(data), experts, n, k, dtype)


def dequantize_mxfp4_bytes(
    packed: bytes,
    scales: bytes,
    experts: int,
    n: int,
    k: int,
    dtype: str = "bf16",
    *,
    allow_nan_scales: bool = False,
) -> bytes:
    """Dequantizes MXFP4 bytes to ``[E, N, K]`` little-endian ``bf16`` (or ``f32``) bytes,
    bit-identical to torchao's ``dequantize``. Raises ``MxmoeError``, also for a scale byte 255
    (E8M0 NaN, naming expert, row and block) unless ``allow_nan_scales=True``, which keeps
    torchao's behaviour (the block's 32 values are NaN). Scale bytes 253 and 254 are accepted;
    codes of magnitude 4 and 6 under 253, and 2 and more under 254, overflow to infinity."""
    return _native.dequantize_mxfp4_bytes(
        bytes(packed), bytes(scales), experts, n, k, dtype, allow_nan_scales=allow_nan_scales
    )


def read_safetensors(
    source: Union[str, "os.PathLike[str]", bytes],
) -> Dict[str, Tuple[str, list, bytes]]:
    """Reads a safetensors file (a path, or its bytes) with mxmoe's reader.

    Returns ``{name: (dtype, shape, data)}`` with the safetensors dtype name (``"BF16"``,
    ``"U8"``, ...) and the raw little-endian bytes. Raises ``MxmoeError`` for malformed files.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(os.fspath(source), "rb") as f:
            data = f.read()
    return _native.read_safetensors(data)


_TORCH_NAMES = frozenset(
    {
        "quantize",
        "dequantize",
        "check_scales",
        "ExpertLinearFunction",
        "MoeBlockFunction",
        "expert_linear",
        "moe_block",
        "MxExpertLinear",
        "MxMoeBlock",
        "route_topk",
    }
)


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from . import autograd  # imports torch; raises ImportError without it

        return getattr(autograd, name)
    raise AttributeError(f"module 'mxmoe' has no attribute {name!r}")
