"""mxmoe: ScatterMoE-LoRA over MXFP4 / NVFP4 / bf16 expert weights, from Python.

The kernels are written in Rust and embedded as PTX for sm_90a (H100/H200); the CUDA driver is
loaded at run time, so neither installing nor importing this package needs a CUDA toolkit.

Without torch (this module): the bit-exact torchao MXFP4 and NVFP4 quantizers and dequantizers on bytes,
mxmoe's safetensors reader, ``run_file`` (one call described by a safetensors file, the format of
``mxmoe run``; on the GPU or the CPU reference), and the error types.

With torch (imported lazily on first use of one of these names; see ``mxmoe.autograd``):
``quantize``/``dequantize`` (MXFP4) and ``quantize_nvfp4``/``dequantize_nvfp4`` (NVFP4,
``Nvfp4Weights``) on tensors, the autograd Functions ``ExpertLinearFunction`` and
``MoeBlockFunction``, the functional ``expert_linear``/``moe_block`` and the modules
``MxExpertLinear``/``MxMoeBlock`` (MXFP4 or NVFP4 experts as buffers, LoRA A/B as parameters).
NVFP4 expert weights run every strategy (``"fused"`` needs K % 32 == 0); ``load_nvfp4_experts``
reads them from ModelOpt or compressed-tensors exports.
Expert parallelism over a torch.distributed group: ``ExpertParallelMoe`` / ``ep_moe_block``
(``mxmoe.distributed``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

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
    "quantize_nvfp4_bytes",
    "dequantize_nvfp4_bytes",
    "read_safetensors",
    "run_file",
    "RunResult",
    # lazily from mxmoe.autograd (need torch):
    "quantize",
    "dequantize",
    "check_scales",
    "Nvfp4Weights",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "check_nvfp4_scales",
    "load_nvfp4_experts",
    "ExpertLinearFunction",
    "MoeBlockFunction",
    "expert_linear",
    "moe_block",
    "MxExpertLinear",
    "MxMoeBlock",
    "route_topk",
    "device_module",
    "torch_clamp_boundary",
    # lazily from mxmoe.distributed (need torch):
    "ExpertParallelMoe",
    "ep_moe_block",
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


def quantize_nvfp4_bytes(
    data: bytes, experts: int, n: int, k: int, dtype: str = "f32", *, two_level: bool = False
) -> Tuple[bytes, bytes, Optional[bytes]]:
    """Quantizes ``[experts, n, k]`` little-endian ``f32`` or ``bf16`` values to NVFP4 (E2M1
    codes, one E4M3 block scale per 16 values), bit-identical to torchao 0.18.0
    ``NVFP4Tensor.to_nvfp4`` applied per expert. With ``two_level=True`` each expert also gets a
    per-tensor f32 scale ``amax / 2688`` (torchao's ``per_tensor_amax_to_scale``; ModelOpt's
    ``weight_scale_2``). Returns ``(packed [E, N, K/2], scales [E, N, K/16], tensor_scales)``
    with ``tensor_scales`` the ``[E]`` little-endian f32 bytes or ``None``. Raises
    ``MxmoeError`` (K % 16, lengths, non-finite values, an all-zero expert with two levels)."""
    return _native.quantize_nvfp4_bytes(bytes(data), experts, n, k, dtype, two_level=two_level)


def dequantize_nvfp4_bytes(
    packed: bytes,
    scales: bytes,
    experts: int,
    n: int,
    k: int,
    tensor_scales: Optional[bytes] = None,
    dtype: str = "bf16",
) -> bytes:
    """Dequantizes NVFP4 bytes to ``[E, N, K]`` little-endian ``bf16`` (or ``f32``) bytes:
    ``code * (tensor_scale * e4m3(scale))``, bit-identical to torchao's
    ``NVFP4Tensor.dequantize``. Raises ``MxmoeError`` for NaN or negative block scales and
    non-finite or non-positive tensor scales."""
    return _native.dequantize_nvfp4_bytes(
        bytes(packed),
        bytes(scales),
        experts,
        n,
        k,
        None if tensor_scales is None else bytes(tensor_scales),
        dtype,
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


class RunResult(NamedTuple):
    """What ``run_file`` computed (the output file's content and how it was made)."""

    tensors: Dict[str, Tuple[str, list, bytes]]
    """``{name: ("BF16", shape, data)}``: ``out`` and the gradients ``d_<input name>``."""
    metadata: Dict[str, str]
    """The output file's metadata: the inputs' and ``mxmoe.mode``, ``mxmoe.backend``, ..."""
    data: bytes
    """The output file (safetensors)."""
    problem: str
    """One line on the problem."""
    backend: str
    """``gpu`` or ``cpu-reference``."""
    device: str
    """The device's name, or ``cpu``."""
    strategy: str
    """The path that multiplied the weights (``reference`` on the CPU)."""
    fallback: Optional[str]
    """Why the CPU reference ran although ``cpu=True`` was not given (no driver or device)."""
    warnings: List[str]
    """Messages for the user, e.g. tensors of the input that the call did not read."""


def run_file(
    inputs: Union[str, "os.PathLike[str]", bytes],
    out: Union[str, "os.PathLike[str]", None] = None,
    *,
    cpu: bool = False,
    device: Optional[int] = None,
    strategy: str = "auto",
    weight: str = "w",
    allow_nan_scales: bool = False,
) -> RunResult:
    """Runs one operator call described by a safetensors file, as ``mxmoe run`` does (the same
    library code; ``mxmoe run --help`` documents the format): a projection (``w``, ``x``,
    ``expert_ids``, optional LoRA, ``gates``, ``dy``) or, with metadata ``mode = block``, the
    gated MoE block.

    ``inputs`` is a path or the file's bytes. ``cpu=True`` computes with the CPU reference (bf16
    rounding at the kernels' points; needs no GPU); ``device=N`` runs on that CUDA device; with
    neither, device 0 is used when there is one, else the CPU reference (``fallback`` says why).
    ``strategy`` is ``auto``, ``fused``, ``selective`` or ``bf16`` (GPU only; ``fused`` and
    ``selective`` need MXFP4 weights). MXFP4 scale byte 255 is refused unless
    ``allow_nan_scales=True``. With ``out``, the output file is written there atomically (a
    temporary file renamed over it); ``out`` may not be the ``inputs`` file.

    Tensors of the input that the call does not read are reported with ``warnings.warn`` (and in
    ``RunResult.warnings``). Raises ``MxmoeError`` (``NoDeviceError`` for a missing ``device``)
    with the library's message, ``ValueError`` when ``out`` is the input file.
    """
    in_path = None
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        data = bytes(inputs)
    else:
        in_path = os.fspath(inputs)
        with open(in_path, "rb") as f:
            data = f.read()
    if out is not None and in_path is not None and _same_file(os.fspath(out), in_path):
        raise ValueError(
            f"out {os.fspath(out)!r} is the inputs file; write the results to another file "
            "(the input would be replaced)"
        )
    r = _native.run_file(
        data,
        cpu=cpu,
        device=device,
        strategy=strategy,
        weight=weight,
        allow_nan_scales=allow_nan_scales,
    )
    for message in r["warnings"]:
        warnings.warn(message, stacklevel=2)
    if out is not None:
        _write_atomic(os.fspath(out), r["data"])
    return RunResult(**r)


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".mxmoe-tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_TORCH_NAMES = frozenset(
    {
        "quantize",
        "dequantize",
        "check_scales",
        "Nvfp4Weights",
        "quantize_nvfp4",
        "dequantize_nvfp4",
        "check_nvfp4_scales",
        "load_nvfp4_experts",
        "ExpertLinearFunction",
        "MoeBlockFunction",
        "expert_linear",
        "moe_block",
        "MxExpertLinear",
        "MxMoeBlock",
        "route_topk",
        "device_module",
        "torch_clamp_boundary",
    }
)


_DISTRIBUTED_NAMES = frozenset({"ExpertParallelMoe", "ep_moe_block"})


def __getattr__(name: str):
    if name in _DISTRIBUTED_NAMES:
        from . import distributed  # imports torch; raises ImportError without it

        return getattr(distributed, name)
    if name in _TORCH_NAMES:
        from . import autograd  # imports torch; raises ImportError without it

        return getattr(autograd, name)
    raise AttributeError(f"module 'mxmoe' has no attribute {name!r}")
