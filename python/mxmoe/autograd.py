"""torch integration: autograd Functions and modules running mxmoe on torch tensors.

Tensors cross into the Rust library by device pointer, shape, strides and dtype; the library
validates them and raises ``MxmoeError`` with its own message. Every launch is ordered on
torch's current stream of the tensors' device, in the device's primary context (the one torch
uses), and no synchronisation is added (except ``strategy="auto"`` / ``"selective"`` with MXFP4
or NVFP4 weights, which read the per-expert row counts back to the host).

Outputs and gradients are computed into mxmoe's own buffers and handed to torch without a copy
(DLPack capsules: torch's tensor keeps the buffer, which is freed, stream-ordered, when torch drops
it).

Conventions (as in the Rust library):

* ``x``: ``[T, K]`` bf16 tokens (or ``[T*k, K]`` per slot, or grouped rows with
  ``input_order="grouped"``); ``ids``: ``[T, k]`` int64/int32 expert ids, ``-1`` drops a slot;
  ``gates``: ``[T, k]`` bf16.
* Expert weights ``W [E, N, K]`` (checkpoint layout, ``y = x @ W[e].T``): MXFP4 as
  ``(packed [E, N, K/2] uint8, scales [E, N, K/32] uint8 or float8_e8m0fnu)``, NVFP4 as
  ``(packed [E, N, K/2] uint8, scales [E, N, K/16] uint8 or float8_e4m3fn, tensor_scales)``
  with ``tensor_scales`` float32 ``[E]`` (one per expert), ``[E, G]`` (G groups of rows per
  expert) or ``None`` (``Nvfp4Weights``, what ``quantize_nvfp4`` returns), or dense bf16.
  NVFP4 weights run every strategy (``"fused"`` decodes them inside the tensor-core K-loop and
  needs K % 32 == 0, else ``MxmoeError``; ``"auto"`` then takes ``"selective"``).
* LoRA (expert-major): ``A [E*r, K]``, ``B [N, E*r]`` bf16, scaling ``s = lora_alpha / r``:
  ``y_p = x_p W_e^T + s * bf16(x_p A_e^T) B_e^T``.
"""

from __future__ import annotations

import ctypes
import math
import os
import functools
import threading
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _native
from ._native import MxmoeError

__all__ = [
    "quantize",
    "dequantize",
    "Nvfp4Weights",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "check_nvfp4_scales",
    "ExpertLinearFunction",
    "MoeBlockFunction",
    "expert_linear",
    "moe_block",
    "MxExpertLinear",
    "MxMoeBlock",
    "route_topk",
]



class Nvfp4Weights(NamedTuple):
    """NVFP4 expert weights ``W [E, N, K]``: ``value = code * (tensor_scale * e4m3(scale))``.

    ``packed [E, N, K/2]`` uint8 E2M1 code pairs (even k in the low nibble), ``scales
    [E, N, K/16]`` E4M3 block scales (uint8 bytes or float8_e4m3fn), ``tensor_scales`` float32
    ``[E]`` (one per expert, ModelOpt's ``weight_scale_2``), ``[E, G]`` (group g of an expert
    covers its rows ``[g*N/G, (g+1)*N/G)``) or ``None`` (single-level scaling)."""

    packed: torch.Tensor
    scales: torch.Tensor
    tensor_scales: Optional[torch.Tensor] = None


Weights = Union[
    torch.Tensor,
    Tuple[torch.Tensor, torch.Tensor],
    Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
]

_DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "f16",
    torch.float32: "f32",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPE_NAMES[torch.float8_e8m0fnu] = "e8m0"
_E4M3 = getattr(torch, "float8_e4m3fn", None)


def _desc(t: torch.Tensor):
    """The descriptor the native module takes: (data_ptr, shape, strides, dtype, device)."""
    name = _DTYPE_NAMES.get(t.dtype, str(t.dtype))
    device = t.device.index if t.device.type == "cuda" else -1
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), name, device)


# ---------------------------------------------------------------------------------------------
# Devices: one native Gpu per (device, stream); the PTX module is loaded once per device.

_lock = threading.Lock()
_base = {}
_gpus = {}


def _gpu(device: torch.device):
    if device.type != "cuda":
        raise MxmoeError(f"tensors must be on a CUDA device, got one on {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    key = (index, stream)
    g = _gpus.get(key)
    if g is not None:
        return g
    with _lock:
        g = _gpus.get(key)
        if g is None:
            base = _base.get(index)
            if base is None:
                base = _native.Gpu(index, stream)
                _base[index] = base
                g = base
            else:
                g = base.on_stream(stream)
            _gpus[key] = g
    return g


def device_module(device=None) -> str:
    """The PTX module mxmoe loaded on ``device`` (default: the current CUDA device) and why, e.g.
    ``"hopper (sm_90a; chosen for compute capability 9.0)"``; ``MXMOE_MODULE=portable`` (set
    before the first call) forces the portable ``sm_80`` module."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return _gpu(dev).module


# ---------------------------------------------------------------------------------------------
# Quantization (CPU, bit-exact torchao FLOOR).


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def _from_bytes(b: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    if len(b) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(b), dtype=dtype).reshape(shape)


def _quantizer_input(w: torch.Tensor) -> Tuple[int, int, int, bytes, str]:
    """``(E, N, K, little-endian bytes, "bf16" | "f32")`` of weights ``[E, N, K]`` (``[N, K]`` is one
    expert) for the native quantizers; bfloat16 stays bfloat16, anything else goes as float32."""
    if w.dim() == 2:
        w = w.unsqueeze(0)
    if w.dim() != 3:
        raise MxmoeError(f"w: expected rank 3 [E, N, K], got shape {list(w.shape)}")
    e, n, k = w.shape
    if w.dtype == torch.bfloat16:
        return e, n, k, _tensor_bytes(w), "bf16"
    return e, n, k, _tensor_bytes(w.float()), "f32"


def quantize(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MXFP4-quantizes ``w [E, N, K]`` (float32 or bfloat16; ``[N, K]`` is one expert) on the CPU,
    bit-identical to torchao 0.17.0 FLOOR mode. Returns ``(packed [E, N, K/2], scales
    [E, N, K/32])`` as uint8 tensors on ``w``'s device."""
    e, n, k, data, dtype = _quantizer_input(w)
    packed, scales = _native.quantize_mxfp4_bytes(data, e, n, k, dtype)
    return (
        _from_bytes(packed, torch.uint8, (e, n, k // 2)).to(w.device),
        _from_bytes(scales, torch.uint8, (e, n, k // 32)).to(w.device),
    )


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    allow_nan_scales: bool = False,
) -> torch.Tensor:
    """Dequantizes ``(packed [E, N, K/2], scales [E, N, K/32])`` to ``[E, N, K]`` bfloat16 (or
    float32) on the CPU, bit-identical to torchao; returned on ``packed``'s device. A scale byte
    255 (NaN) raises ``MxmoeError`` unless ``allow_nan_scales=True`` (torchao's behaviour)."""
    if packed.dim() != 3:
        raise MxmoeError(f"packed: expected rank 3, got shape {list(packed.shape)}")
    e, n, half = packed.shape
    k = 2 * half
    name = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(dtype)
    if name is None:
        raise MxmoeError(f"dtype: expected torch.bfloat16 or torch.float32, got {dtype}")
    out = _native.dequantize_mxfp4_bytes(
        _tensor_bytes(packed),
        _tensor_bytes(scales.view(torch.uint8)),
        e,
        n,
        k,
        name,
        allow_nan_scales=allow_nan_scales,
    )
    return _from_bytes(out, dtype, (e, n, k)).to(packed.device)


def quantize_nvfp4(w: torch.Tensor, *, two_level: bool = False) -> Nvfp4Weights:
    """NVFP4-quantizes ``w [E, N, K]`` (float32 or bfloat16; ``[N, K]`` is one expert; K a
    multiple of 16) on the CPU, bit-identical to torchao 0.18.0 ``NVFP4Tensor.to_nvfp4`` per
    expert (the library's quantizer, ``quantize_nvfp4_bytes``). With ``two_level=True`` each
    expert also gets a float32 tensor scale ``amax / 2688``. Returns ``Nvfp4Weights(packed
    [E, N, K/2] uint8, scales [E, N, K/16] uint8 (E4M3 bytes), tensor_scales [E] float32 or
    None)`` on ``w``'s device. Raises ``MxmoeError`` (K % 16, non-finite values, an all-zero
    expert with two levels)."""
    e, n, k, data, dtype = _quantizer_input(w)
    packed, scales, tensor_scales = _native.quantize_nvfp4_bytes(
        data, e, n, k, dtype, two_level=two_level
    )
    return Nvfp4Weights(
        _from_bytes(packed, torch.uint8, (e, n, k // 2)).to(w.device),
        _from_bytes(scales, torch.uint8, (e, n, k // 16)).to(w.device),
        None if tensor_scales is None else _from_bytes(tensor_scales, torch.float32, (e,)).to(w.device),
    )


def _nv_scale_bytes(scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 block scales as their uint8 bytes (a float8_e4m3fn tensor is viewed, not
    converted); any other dtype is returned as is for the caller's check to report."""
    if _E4M3 is not None and scales.dtype == _E4M3:
        return scales.view(torch.uint8)
    return scales


def _nv_tensor_scale_groups(tensor_scales: Optional[torch.Tensor], e: int, n: int) -> int:
    """The tensor-scale groups per expert (1 without tensor scales); ``MxmoeError`` for a
    dtype or shape the library would refuse."""
    if tensor_scales is None:
        return 1
    if tensor_scales.dtype != torch.float32:
        raise MxmoeError(f"NVFP4 tensor_scales: expected dtype f32, got {tensor_scales.dtype}")
    shape = tuple(tensor_scales.shape)
    if len(shape) == 1 and shape[0] == e:
        return 1
    if len(shape) == 2 and shape[0] == e and shape[1] > 0 and n % shape[1] == 0:
        return shape[1]
    raise MxmoeError(
        f"NVFP4 tensor_scales: expected [{e}] or [{e}, G] with G dividing N = {n}, got {list(shape)}"
    )


def dequantize_nvfp4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    tensor_scales: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantizes NVFP4 ``(packed [E, N, K/2], scales [E, N, K/16], tensor_scales)`` (see
    ``Nvfp4Weights``) to ``[E, N, K]`` bfloat16 (or float32) on the CPU with the library's
    dequantizer (bit-identical to torchao's ``NVFP4Tensor.dequantize``); returned on
    ``packed``'s device. Raises ``MxmoeError`` for shapes that disagree, NaN or negative block
    scales and non-finite or non-positive tensor scales."""
    if packed.dim() != 3:
        raise MxmoeError(f"NVFP4 packed: expected rank 3 [E, N, K/2], got shape {list(packed.shape)}")
    if packed.dtype != torch.uint8:
        raise MxmoeError(f"NVFP4 packed: expected dtype u8, got {packed.dtype}")
    e, n, half = packed.shape
    k = 2 * half
    scales = _nv_scale_bytes(scales)
    if scales.dtype != torch.uint8:
        raise MxmoeError(f"NVFP4 scales: expected dtype u8 or float8_e4m3fn, got {scales.dtype}")
    if tuple(scales.shape) != (e, n, k // 16):
        raise MxmoeError(
            f"NVFP4 scales: expected [{e}, {n}, {k // 16}] ([E, N, K/16] for packed "
            f"{list(packed.shape)}), got {list(scales.shape)}"
        )
    name = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(dtype)
    if name is None:
        raise MxmoeError(f"dtype: expected torch.bfloat16 or torch.float32, got {dtype}")
    groups = _nv_tensor_scale_groups(tensor_scales, e, n)
    rows = n // groups
    parts = []
    # One call per group of rows: the byte dequantizer takes one tensor scale per expert.
    for g in range(groups):
        sl = slice(g * rows, (g + 1) * rows)
        ts = None
        if tensor_scales is not None:
            ts = _tensor_bytes(tensor_scales.reshape(e, groups)[:, g])
        out = _native.dequantize_nvfp4_bytes(
            _tensor_bytes(packed[:, sl]), _tensor_bytes(scales[:, sl]), e, rows, k, ts, name
        )
        parts.append(_from_bytes(out, dtype, (e, rows, k)))
    w = parts[0] if groups == 1 else torch.cat(parts, dim=1)
    return w.to(packed.device)


def load_nvfp4_experts(
    source: Union[str, "os.PathLike[str]", bytes],
    prefix: str,
    experts: int,
    projections: Sequence[str],
    k: int,
    device: Optional[Union[str, torch.device]] = None,
) -> Nvfp4Weights:
    """Loads NVFP4 MoE experts exported one linear per expert and projection — ModelOpt
    (``{prefix}.{e}.{proj}.weight``, ``.weight_scale``, ``.weight_scale_2``) or compressed-tensors
    (``.weight_packed``, ``.weight_scale``, ``.weight_global_scale``, whose reciprocal is the tensor
    scale) — from a safetensors file (path or bytes) with the library's reader, stacking each
    expert's projections along N: ``["gate_proj", "up_proj"]`` gives a split-layout ``gate_up``
    ``[E, 2I, K]`` with one tensor scale per projection (``tensor_scales [E, 2]``), ``["down_proj"]``
    a ``down`` (``tensor_scales [E]``). ``prefix`` is e.g. ``"model.layers.0.mlp.experts"`` and
    ``k`` the linears' input features. Returns ``Nvfp4Weights`` on ``device`` (CPU by default),
    ready for ``expert_linear``/``moe_block``/``MxExpertLinear``/``MxMoeBlock``. Raises
    ``MxmoeError`` naming the tensor for a missing tensor, a wrong dtype or shape, mixed layouts or
    invalid values (NaN or negative block scales, tensor scales that are not finite and
    positive)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(source, "rb") as f:
            data = f.read()
    packed, scales, tensor_scales, (e, n, k_dim), groups, _layout = _native.read_nvfp4_experts(
        data, prefix, experts, list(projections), k
    )
    ts = _from_bytes(tensor_scales, torch.float32, (e, groups) if groups > 1 else (e,))
    out = Nvfp4Weights(
        _from_bytes(packed, torch.uint8, (e, n, k_dim // 2)),
        _from_bytes(scales, torch.uint8, (e, n, k_dim // 16)),
        ts,
    )
    if device is None:
        return out
    return Nvfp4Weights(*(t.to(device) for t in out))


def check_nvfp4_scales(
    scales: torch.Tensor, tensor_scales: Optional[torch.Tensor] = None, what: str = "NVFP4"
) -> None:
    """Raises ``MxmoeError`` if NVFP4 block ``scales [E, N, K/16]`` (uint8 or float8_e4m3fn,
    any device) hold a NaN (``0x7F``/``0xFF``) or negative E4M3 byte, or ``tensor_scales`` a
    non-finite or non-positive value, naming the first one (the rules the library's host
    container enforces; the device kernels read the bytes as they are). Costs a reduction on
    the scales' device and a host synchronisation."""
    u8 = _nv_scale_bytes(scales)
    if u8.dim() == 3 and u8.dtype == torch.uint8:
        bad = ((u8 & 0x80) != 0) | ((u8 & 0x7F) == 0x7F)
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0].item())
            _, n, blocks = u8.shape
            expert, row, block = first // (n * blocks), (first // blocks) % n, first % blocks
            byte = int(u8.reshape(-1)[first].item())
            kind = "NaN" if byte & 0x7F == 0x7F else "negative"
            raise MxmoeError(
                f"{what}: block scale byte {byte:#04x} at expert {expert}, row {row}, block "
                f"{block} is {kind} (block scales are finite and non-negative E4M3)"
            )
    if tensor_scales is not None and tensor_scales.is_floating_point() and tensor_scales.numel() > 0:
        flat = tensor_scales.reshape(-1)
        bad = ~(torch.isfinite(flat) & (flat > 0))
        if bool(bad.any()):
            index = int(bad.nonzero()[0].item())
            groups = tensor_scales.shape[1] if tensor_scales.dim() == 2 else 1
            raise MxmoeError(
                f"{what}: tensor scale {index} (expert {index // max(groups, 1)}) is "
                f"{flat[index].item()} (it must be finite and positive)"
            )


# ---------------------------------------------------------------------------------------------
# The expert linear.


def check_scales(scales: torch.Tensor, what: str = "scales") -> None:
    """Raises ``MxmoeError`` if MXFP4 ``scales [E, N, K/32]`` (uint8 or float8_e8m0fnu, any
    device) hold the E8M0 NaN byte 255, naming the first expert, row and block. Such a block
    makes its 32 weights NaN and carries NaN into ``out``, ``dx`` and ``d_gates``. Costs one
    reduction on the scales' device and a host synchronisation."""
    if scales.dim() != 3:
        return  # the native layer reports the shape
    u8 = scales if scales.dtype == torch.uint8 else scales.view(torch.uint8)
    bad = u8 == 255
    if not bool(bad.any()):
        return
    first = int(bad.reshape(-1).nonzero()[0].item())
    _, n, blocks = u8.shape
    expert, row, block = first // (n * blocks), (first // blocks) % n, first % blocks
    raise MxmoeError(
        f"{what}: scale byte 255 (E8M0 NaN) at expert {expert}, row {row}, block {block} "
        f"(k = {32 * block} to {32 * block + 31}); NaN scales are rejected unless "
        f"allow_nan_scales=True (torchao's propagate behaviour)"
    )


def _weights_arg(
    w0: torch.Tensor,
    w1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor] = None,
    kind: Optional[str] = None,
):
    """The native weights argument. ``kind`` is ``"bf16"``, ``"mxfp4"`` or ``"nvfp4"``; ``None``
    means bf16 without ``w1`` and MXFP4 with it (the forms before NVFP4)."""
    if kind is None:
        kind = "bf16" if w1 is None else "mxfp4"
    if kind == "bf16":
        return ("bf16", _desc(w0))
    if kind == "mxfp4":
        return ("mxfp4", _desc(w0), _desc(w1))
    return ("nvfp4", _desc(w0), _desc(w1), None if w2 is None else _desc(w2))


def _weights_shape(w0: torch.Tensor, w1: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    if w1 is None:
        e, n, k = w0.shape
        return e, n, k
    e, n, half = w0.shape
    return e, n, 2 * half


def _split_weights(weights: Weights):
    """``(kind, w0, w1, w2)``: ``("bf16", W, None, None)``, ``("mxfp4", packed, scales,
    None)`` or ``("nvfp4", packed, scale bytes, tensor_scales or None)``, contiguous."""
    if isinstance(weights, torch.Tensor):
        return "bf16", weights.contiguous(), None, None
    if isinstance(weights, (tuple, list)) and len(weights) == 2:
        packed, scales = weights
        return "mxfp4", packed.contiguous(), scales.contiguous(), None
    if isinstance(weights, (tuple, list)) and len(weights) == 3:
        packed, scales, tensor_scales = weights
        ts = tensor_scales.contiguous() if tensor_scales is not None else None
        return "nvfp4", packed.contiguous(), _nv_scale_bytes(scales.contiguous()), ts
    raise MxmoeError(
        "expert weights: expected a bf16 [E, N, K] tensor, (packed, scales) for MXFP4 or "
        "(packed, scales, tensor_scales) for NVFP4"
    )


def _check_weight_scales(kind, w1, w2, what: str, allow_nan_scales: bool) -> None:
    """The scale check of ``expert_linear`` / ``moe_block`` (skipped with
    ``allow_nan_scales``): ``check_scales`` for MXFP4, ``check_nvfp4_scales`` for NVFP4."""
    if allow_nan_scales:
        return
    if kind == "mxfp4":
        check_scales(w1, what)
    elif kind == "nvfp4":
        check_nvfp4_scales(w1, w2, what)


def _lora_arg(a, b, experts, scaling):
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise MxmoeError("LoRA: give both lora_A and lora_B, or neither")
    return (_desc(a), _desc(b), a.shape[0] // max(experts, 1), float(scaling))


def _take(capsule) -> Optional[torch.Tensor]:
    """A tensor over an output buffer mxmoe allocated (DLPack capsule, no copy), or ``None``.
    The buffer is freed, ordered on its stream, when torch releases the tensor."""
    return None if capsule is None else torch.from_dlpack(capsule)


class ExpertLinearFunction(torch.autograd.Function):
    """``y = ExpertLinearFunction.apply(x, ids, gates, lora_A, lora_B, w0, w1, scaling,
    input_order, output_order, strategy)``.

    ``w0, w1`` are ``(packed, scales)`` for MXFP4 weights or ``(W, None)`` for bf16 weights;
    NVFP4 weights pass ``(packed, scale bytes)`` with the trailing ``w2`` (tensor scales or
    None) and ``weights_kind="nvfp4"``.
    ``gates`` (``[T, k]`` or None) combine the per-slot outputs into ``[T, N]`` (needs
    ``output_order="scattered"``); without gates the output is ``[T*k, N]``. Gradients flow to
    ``x``, ``gates``, ``lora_A`` and ``lora_B``; the frozen weights get none.
    """

    @staticmethod
    def forward(ctx, x, ids, gates, lora_a, lora_b, w0, w1, scaling, input_order, output_order, strategy,
                w2=None, weights_kind=None):
        x = x.contiguous()
        ids = ids.contiguous()
        gates = gates.contiguous() if gates is not None else None
        lora_a = lora_a.contiguous() if lora_a is not None else None
        lora_b = lora_b.contiguous() if lora_b is not None else None
        e, _, _ = _weights_shape(w0, w1)
        keep = any(ctx.needs_input_grad)
        out, state = _native.linear_forward(
            _gpu(x.device),
            _desc(x),
            _desc(ids),
            _weights_arg(w0, w1, w2, weights_kind),
            lora=_lora_arg(lora_a, lora_b, e, scaling),
            gates=_desc(gates) if gates is not None else None,
            input_order=input_order,
            output_order=output_order,
            strategy=strategy,
            keep_state=keep,
        )
        if keep:
            ctx.state = state
            # Keeps every borrowed buffer alive (and version-checked) until backward.
            ctx.save_for_backward(x, ids, gates, lora_a, lora_b, w0, w1, w2)
        return _take(out)

    @staticmethod
    def backward(ctx, dy):
        x, _ids, gates, lora_a, lora_b, _w0, _w1, _w2 = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        need = ctx.needs_input_grad
        # The native state is consumed (a second backward raises MxmoeError: no retain_graph).
        dx, da, db, d_gates = (
            _take(c) for c in _native.linear_backward(_gpu(dy.device), ctx.state, _desc(dy))
        )
        return (
            dx if need[0] else None,
            None,
            d_gates if need[2] else None,
            da if need[3] else None,
            db if need[4] else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def expert_linear(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: Weights,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    gates: Optional[torch.Tensor] = None,
    input_order: str = "scattered",
    output_order: str = "scattered",
    strategy: str = "auto",
    *,
    allow_nan_scales: bool = False,
) -> torch.Tensor:
    """The LoRA-fused expert linear (one projection). ``weights`` is ``(packed, scales)`` (MXFP4),
    ``(packed, scales, tensor_scales)`` (NVFP4, e.g. ``Nvfp4Weights``; ``strategy`` ``"auto"``
    or ``"selective"``) or a bf16 ``[E, N, K]`` tensor. See ``ExpertLinearFunction``. MXFP4
    scales holding the NaN byte 255 raise ``MxmoeError`` (``check_scales``), and so do NVFP4
    scales the library's container refuses (``check_nvfp4_scales``), unless
    ``allow_nan_scales=True``."""
    kind, w0, w1, w2 = _split_weights(weights)
    _check_weight_scales(kind, w1, w2, "scales", allow_nan_scales)
    return ExpertLinearFunction.apply(
        x, ids, gates, lora_A, lora_B, w0, w1, scaling, input_order, output_order, strategy, w2, kind
    )


# ---------------------------------------------------------------------------------------------
# The gated MoE block.


class MoeBlockFunction(torch.autograd.Function):
    """``y = MoeBlockFunction.apply(x, ids, gates, gu_A, gu_B, dn_A, dn_B, gu_w0, gu_w1, dn_w0,
    dn_w1, gu_scaling, dn_scaling, limit, strategy, activation, alpha, clamp_boundary,
    gate_up_bias, down_bias, gu_w2, dn_w2, gu_kind, dn_kind)``: the gated MoE MLP.
    ``gate_up [E, 2I, H]``, ``down [E, H, I]``; each projection's weights as in
    ``ExpertLinearFunction`` (``*_w2`` and ``*_kind`` only for NVFP4).

    - ``activation="swiglu"``: ``y[t] = sum_j gates[t, j] * down_e(silu(g) * u)`` with
      ``[g | u] = gate_up_e(x[t])`` (gate half first), ``e = ids[t, j]``; ``limit`` is
      DeepSeek-V4's optional clamp.
    - ``activation="gpt_oss"``: gpt-oss's block: ``z = gate_up_e(x[t]) + gate_up_bias[e]`` with
      gate ``i`` in column ``2i`` and up ``i`` in ``2i + 1`` (the checkpoint's order),
      ``h = (clamp(u, -L, L) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, L)``,
      ``y[t] = sum_j gates[t, j] * (down_e(h) + down_bias[e])``. ``alpha`` defaults to 1.702,
      ``limit`` (L) to 7.0; ``clamp_boundary`` "strict" gives a zero gradient at exactly ±L
      (current torch), "inclusive" passes it. The biases are frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x, ids, gates, gu_a, gu_b, dn_a, dn_b, gu_w0, gu_w1, dn_w0, dn_w1,
                gu_scaling, dn_scaling, limit, strategy, activation="swiglu", alpha=None,
                clamp_boundary="strict", gate_up_bias=None, down_bias=None, gu_w2=None, dn_w2=None,
                gu_kind=None, dn_kind=None):
        x = x.contiguous()
        ids = ids.contiguous()
        gates = gates.contiguous()
        gu_a, gu_b, dn_a, dn_b = (t.contiguous() if t is not None else None for t in (gu_a, gu_b, dn_a, dn_b))
        e, _, _ = _weights_shape(gu_w0, gu_w1)
        # Held until the native call returns (a converted copy must outlive the launch).
        gu_bias = _bias(gate_up_bias) if gate_up_bias is not None else None
        dn_bias = _bias(down_bias) if down_bias is not None else None
        keep = any(ctx.needs_input_grad)
        out, state = _native.moe_forward(
            _gpu(x.device),
            _desc(x),
            _desc(ids),
            _desc(gates),
            _weights_arg(gu_w0, gu_w1, gu_w2, gu_kind),
            _weights_arg(dn_w0, dn_w1, dn_w2, dn_kind),
            lora_gate_up=_lora_arg(gu_a, gu_b, e, gu_scaling),
            lora_down=_lora_arg(dn_a, dn_b, e, dn_scaling),
            limit=limit,
            strategy=strategy,
            keep_state=keep,
            activation=activation,
            alpha=alpha,
            clamp_boundary=clamp_boundary,
            gate_up_bias=_desc(gu_bias) if gu_bias is not None else None,
            down_bias=_desc(dn_bias) if dn_bias is not None else None,
        )
        if keep:
            ctx.state = state
            ctx.save_for_backward(x, ids, gates, gu_a, gu_b, dn_a, dn_b, gu_w0, gu_w1, dn_w0, dn_w1,
                                  gu_w2, dn_w2)
        return _take(out)

    @staticmethod
    def backward(ctx, dy):
        x, _ids, gates, gu_a, gu_b, dn_a, dn_b, *_w = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous()
        need = ctx.needs_input_grad
        dx, d_gates, *grads = (
            _take(c) for c in _native.moe_backward(_gpu(dy.device), ctx.state, _desc(dy))
        )
        return (
            dx if need[0] else None,
            None,
            d_gates if need[2] else None,
            *(g if need[3 + i] else None for i, g in enumerate(grads)),
            None, None, None, None, None, None, None, None,
            None, None, None, None, None,
            None, None, None, None,
        )


def moe_block(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    gate_up: Weights,
    down: Weights,
    gate_up_lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    down_lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    limit: Optional[float] = None,
    strategy: str = "auto",
    *,
    activation: str = "swiglu",
    alpha: Optional[float] = None,
    clamp_boundary: str = "strict",
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    allow_nan_scales: bool = False,
) -> torch.Tensor:
    """The gated MoE MLP block. ``*_lora`` are ``(A, B, scaling)`` with ``A [E*r, K]`` and
    ``B [N, E*r]`` expert-major (column ``e*r + j``; PEFT's B is rank-major, see
    ``mxmoe.gpt_oss``). ``activation`` is ``"swiglu"`` or ``"gpt_oss"`` (interleaved gate/up,
    frozen ``gate_up_bias [E, 2I]`` and ``down_bias [E, H]``, ``alpha``, ``limit`` and
    ``clamp_boundary``). ``gate_up`` and ``down`` take the weight forms of ``expert_linear``
    (bf16, MXFP4 or NVFP4, each its own). See ``MoeBlockFunction``. MXFP4 scales holding the
    NaN byte 255, and NVFP4 scales the library refuses, raise ``MxmoeError`` unless
    ``allow_nan_scales=True``."""
    gu_kind, gu0, gu1, gu2 = _split_weights(gate_up)
    dn_kind, dn0, dn1, dn2 = _split_weights(down)
    _check_weight_scales(gu_kind, gu1, gu2, "gate_up scales", allow_nan_scales)
    _check_weight_scales(dn_kind, dn1, dn2, "down scales", allow_nan_scales)
    gu_a, gu_b, gu_s = gate_up_lora if gate_up_lora is not None else (None, None, 1.0)
    dn_a, dn_b, dn_s = down_lora if down_lora is not None else (None, None, 1.0)
    return MoeBlockFunction.apply(
        x, ids, gates, gu_a, gu_b, dn_a, dn_b, gu0, gu1, dn0, dn1, gu_s, dn_s, limit, strategy,
        activation, alpha, clamp_boundary, gate_up_bias, down_bias, gu2, dn2, gu_kind, dn_kind,
    )


@functools.lru_cache(maxsize=None)
def torch_clamp_boundary() -> str:
    """The installed torch's clamp gradient at exactly the bound: ``"strict"`` (0, current torch)
    or ``"inclusive"`` (1, torch before the 2026 change). Pass it as ``moe_block``'s
    ``clamp_boundary`` to match a torch implementation of the same activation under this torch."""
    with torch.enable_grad():  # first called, maybe, under no_grad (inference, checkpointing)
        x = torch.tensor([2.0, -2.0, 2.0], requires_grad=True)
        y = torch.cat([x[:2].clamp(min=-2.0, max=2.0), x[2:].clamp(max=2.0)])
        y.sum().backward()
    g = x.grad.tolist()
    if g == [0.0, 0.0, 0.0]:
        return "strict"
    if g == [1.0, 1.0, 1.0]:
        return "inclusive"
    raise MxmoeError(f"torch's clamp gradient at the bound is inconsistent ({g}); cannot pick a rule")


def _bias(b: torch.Tensor) -> torch.Tensor:
    """A frozen bias as the kernels read it: bf16, contiguous, detached (no gradient flows)."""
    return b.detach().to(torch.bfloat16).contiguous()


def route_topk(logits: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax router: ``(ids [T, k] int64, gates [T, k] bf16)``, gates renormalised over the
    chosen experts (differentiable with respect to ``logits``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(probs, top_k, dim=-1)
    gates = vals / vals.sum(dim=-1, keepdim=True)
    return ids, gates.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Modules.


def _lora_params(experts, rank, k, n, device):
    a = torch.empty((experts * rank, k), dtype=torch.bfloat16, device=device)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros((n, experts * rank), dtype=torch.bfloat16, device=device)
    return torch.nn.Parameter(a), torch.nn.Parameter(b)


class MxExpertLinear(torch.nn.Module):
    """One MoE expert projection with frozen quantized experts ``W [E, N, K]`` and trainable
    expert-major LoRA ``lora_A [E*r, K]``, ``lora_B [N, E*r]`` (bf16 parameters; B starts at zero
    as in peft), scaling ``lora_alpha / r``.

    ``weight_format="mxfp4"`` (default): buffers ``packed [E, N, K/2]`` and ``scales
    [E, N, K/32]`` (K a multiple of 32). ``weight_format="nvfp4"``: buffers ``packed``, ``scales
    [E, N, K/16]`` (E4M3 bytes) and ``tensor_scales`` (float32 ``[E]``; ``None`` for
    single-level weights; K a multiple of 16); NVFP4 runs every strategy (``"fused"`` needs K a
    multiple of 32).

    Scales the library refuses (MXFP4: the NaN byte 255; NVFP4: NaN or negative block scales,
    non-finite or non-positive tensor scales) raise ``MxmoeError`` on the first forward after
    they change (checked once per buffer version) unless ``allow_nan_scales=True``."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int = 8,
                 lora_alpha: Optional[float] = None, strategy: str = "auto", device=None,
                 allow_nan_scales: bool = False, weight_format: str = "mxfp4"):
        super().__init__()
        self.allow_nan_scales = allow_nan_scales
        self._checked_scales = None
        e, k, n = num_experts, in_features, out_features
        if weight_format not in ("mxfp4", "nvfp4"):
            raise MxmoeError(f'weight_format: expected "mxfp4" or "nvfp4", got {weight_format!r}')
        block = 32 if weight_format == "mxfp4" else 16
        if k % block != 0:
            raise MxmoeError(
                f"K = {k} is not a multiple of the {weight_format.upper()} block size {block}"
            )
        self.weight_format = weight_format
        self.num_experts, self.in_features, self.out_features = e, k, n
        self.rank, self.strategy = rank, strategy
        self.scaling = (lora_alpha if lora_alpha is not None else rank) / max(rank, 1)
        self.register_buffer("packed", torch.zeros((e, n, k // 2), dtype=torch.uint8, device=device))
        if weight_format == "mxfp4":
            self.register_buffer("scales", torch.full((e, n, k // 32), 127, dtype=torch.uint8, device=device))
        else:
            # 0x38 is E4M3 1.0; tensor scales 1.0: valid two-level weights (all zeros).
            self.register_buffer("scales", torch.full((e, n, k // 16), 0x38, dtype=torch.uint8, device=device))
            self.register_buffer("tensor_scales", torch.ones((e,), dtype=torch.float32, device=device))
        if rank > 0:
            self.lora_A, self.lora_B = _lora_params(e, rank, k, n, device)
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)

    @classmethod
    def from_weight(cls, w: torch.Tensor, rank: int = 8, lora_alpha: Optional[float] = None,
                    strategy: str = "auto", *, weight_format: str = "mxfp4",
                    two_level: bool = False) -> "MxExpertLinear":
        """Quantizes ``w [E, N, K]`` (bit-exact torchao: ``quantize``, or ``quantize_nvfp4`` with
        ``two_level`` for ``weight_format="nvfp4"``) into a new module on ``w``'s device."""
        e, n, k = w.shape
        m = cls(e, k, n, rank, lora_alpha, strategy, device=w.device, weight_format=weight_format)
        m.load_weights(w, two_level=two_level)
        return m

    def load_weights(self, w: torch.Tensor, *, two_level: bool = False) -> None:
        """Quantizes ``w [E, N, K]`` into this module's buffers in its ``weight_format``."""
        if self.weight_format == "mxfp4":
            self.packed, self.scales = quantize(w)
        else:
            self.packed, self.scales, self.tensor_scales = quantize_nvfp4(w, two_level=two_level)

    @property
    def weights(self) -> Weights:
        """The frozen weights as ``expert_linear`` takes them: ``(packed, scales)`` or
        ``Nvfp4Weights(packed, scales, tensor_scales)``."""
        if self.weight_format == "mxfp4":
            return (self.packed, self.scales)
        return Nvfp4Weights(self.packed, self.scales, self.tensor_scales)

    def _check_scales_once(self, what: str = "scales") -> None:
        """The scale check (``check_scales`` / ``check_nvfp4_scales``) unless allowed or already
        done for these buffers and versions."""
        if self.allow_nan_scales:
            return
        key = (self.scales.data_ptr(), self.scales._version, tuple(self.scales.shape))
        if self.weight_format == "nvfp4":
            t = self.tensor_scales
            key += (None,) if t is None else (t.data_ptr(), t._version, tuple(t.shape))
        if key != self._checked_scales:
            if self.weight_format == "mxfp4":
                check_scales(self.scales, what)
            else:
                check_nvfp4_scales(self.scales, self.tensor_scales, what)
            self._checked_scales = key

    def forward(self, x, ids, gates=None, input_order="scattered", output_order="scattered"):
        self._check_scales_once()
        return expert_linear(x, ids, self.weights, self.lora_A, self.lora_B,
                             self.scaling, gates, input_order, output_order, self.strategy,
                             allow_nan_scales=True)

    def extra_repr(self):
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
                f"rank={self.rank}, scaling={self.scaling}, strategy={self.strategy!r}, "
                f"weight_format={self.weight_format!r}")


class MxMoeBlock(torch.nn.Module):
    """The gated SwiGLU MoE MLP with frozen quantized experts ``gate_up [E, 2I, H]`` and
    ``down [E, H, I]`` (``weight_format`` ``"mxfp4"`` or ``"nvfp4"``, see ``MxExpertLinear``)
    and LoRA on both projections. ``forward(x, ids, gates)``; the router (e.g. ``route_topk``)
    is the caller's."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, rank: int = 8,
                 lora_alpha: Optional[float] = None, limit: Optional[float] = None,
                 strategy: str = "auto", device=None, allow_nan_scales: bool = False,
                 weight_format: str = "mxfp4"):
        super().__init__()
        self.gate_up = MxExpertLinear(num_experts, hidden, 2 * intermediate, rank, lora_alpha,
                                      strategy, device, allow_nan_scales, weight_format)
        self.down = MxExpertLinear(num_experts, intermediate, hidden, rank, lora_alpha, strategy,
                                   device, allow_nan_scales, weight_format)
        self.limit, self.strategy = limit, strategy

    @classmethod
    def from_weights(cls, gate_up: torch.Tensor, down: torch.Tensor, rank: int = 8,
                     lora_alpha: Optional[float] = None, limit: Optional[float] = None,
                     strategy: str = "auto", *, weight_format: str = "mxfp4",
                     two_level: bool = False) -> "MxMoeBlock":
        """Quantizes ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` (see
        ``MxExpertLinear.from_weight``) into a new block on ``gate_up``'s device."""
        e, two_i, h = gate_up.shape
        m = cls(e, h, two_i // 2, rank, lora_alpha, limit, strategy, device=gate_up.device,
                weight_format=weight_format)
        m.gate_up.load_weights(gate_up, two_level=two_level)
        m.down.load_weights(down, two_level=two_level)
        return m

    def forward(self, x, ids, gates):
        gu, dn = self.gate_up, self.down
        gu._check_scales_once("gate_up scales")
        dn._check_scales_once("down scales")
        gu_lora = (gu.lora_A, gu.lora_B, gu.scaling) if gu.rank > 0 else None
        dn_lora = (dn.lora_A, dn.lora_B, dn.scaling) if dn.rank > 0 else None
        return moe_block(x, ids, gates, gu.weights, dn.weights,
                         gu_lora, dn_lora, self.limit, self.strategy, allow_nan_scales=True)


# ---------------------------------------------------------------------------------------------
# Eager per-expert pieces shared by the CPU paths (``mxmoe.gpt_oss``'s fallback and
# ``mxmoe.distributed``'s local block).


def eager_expert_weight(w, e: int, dtype: torch.dtype, allow_nan_scales: bool = False) -> torch.Tensor:
    """Expert ``e``'s ``[N, K]`` weight in ``dtype``: a dense ``[E, N, K]`` tensor's slice, or the
    expert dequantized on the CPU from ``(packed, scales)`` (MXFP4) or ``(packed, scales,
    tensor_scales)`` (NVFP4)."""
    if isinstance(w, torch.Tensor):
        return w[e].to(dtype)
    if len(w) == 3:
        packed, scales, ts = w
        ts = None if ts is None else ts[e : e + 1]
        return dequantize_nvfp4(packed[e : e + 1], scales[e : e + 1], ts, torch.float32)[0].to(dtype)
    packed, scales = w
    return dequantize(
        packed[e : e + 1], scales[e : e + 1], torch.float32, allow_nan_scales=allow_nan_scales
    )[0].to(dtype)


def eager_projection(x, w, bias, lora, e: int, e_count: int) -> torch.Tensor:
    """Expert ``e``'s ``x·Wᵀ (+ b) + s·(x·A_eᵀ)·B_eᵀ`` (expert-major LoRA ``(A [E·r, K], B [N, E·r],
    s)`` or ``None``; ``bias`` ``[N]`` or ``None``), accumulated in fp32 and rounded to ``x``'s
    dtype once, at the point the kernels round (their epilogue adds the bias and the LoRA term
    to the fp32 accumulator). Rounding ``x·Wᵀ`` first and adding the LoRA term after would put a
    second rounding into the pre-activation, which the activation's derivative carries into the
    LoRA gradients (2x transformers' own bf16 error on gpt-oss's gate/up projection)."""
    z = x.float() @ w.float().T
    if bias is not None:
        z = z + bias.float()
    if lora is not None:
        a, b, s = lora
        r = a.shape[0] // e_count
        z = z + s * ((x.float() @ a[e * r : (e + 1) * r].float().T) @ b[:, e * r : (e + 1) * r].float().T)
    return z.to(x.dtype)
