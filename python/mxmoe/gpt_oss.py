"""gpt-oss (openai/gpt-oss-20b, -120b) with MXFP4-resident experts, for transformers 5.x + PEFT.

What this module gives (``import mxmoe.gpt_oss``; needs torch and transformers >= 5, PEFT for the
LoRA parts):

* ``from_pretrained(path)``: a ``GptOssForCausalLM`` whose experts are ``MxGptOssExperts``, filled
  straight from the checkpoint's ``*_blocks`` / ``*_scales`` / ``*_bias`` tensors (sharded
  safetensors, ``model.safetensors.index.json``); the rest of the model in ``dtype`` (bf16). No bf16
  copy of the experts is ever made.
* ``convert(model)``: replaces every ``GptOssExperts`` of an already loaded dense model (e.g.
  ``Mxfp4Config(dequantize=True)``) by ``MxGptOssExperts``, re-quantizing layer by layer with
  ``mxmoe.quantize`` (value-exact for weights that came from an MXFP4 checkpoint; checked).
* ``MxGptOssExperts``: the experts module (MXFP4 buffers named like the checkpoint tensors, frozen
  biases, alpha and limit from the config). ``forward(hidden [T, H], top_k_index [T, k],
  top_k_weights [T, k])`` runs ``mxmoe.moe_block(..., activation="gpt_oss")`` on CUDA and an exact
  torch eager fallback (per-expert dequantize, transformers' formula) on the CPU.
* The experts implementation ``"mxmoe"`` registered in transformers' ``ALL_EXPERTS_FUNCTIONS``
  (``experts_implementation="mxmoe"``): on a stock dense ``GptOssExperts`` it runs mxmoe's block
  with the dense weights as they are (no quantization, frozen weights).
* PEFT: ``get_peft_model(model, LoraConfig(..., target_parameters=["mlp.experts.gate_up_proj",
  "mlp.experts.down_proj"]))`` takes the stock config and puts the expert LoRA in ``MxLoraExperts``
  (a PEFT ``LoraLayer``), nested exactly like PEFT's ``ParamWrapper`` (inner ``base_layer`` =
  gate_up, outer = down) with PEFT's shapes (A ``[E*r, in]`` expert-major, B ``[out, E*r]``
  rank-major), so ``save_pretrained`` writes an adapter that stock transformers + PEFT load on the
  dense model, and ``load_adapter`` loads stock adapters. PEFT's machinery (trainable flags,
  ``save_pretrained``, ``disable_adapter``, ``set_adapter``, dtype autocast) sees a normal LoRA layer.

Supported versions: transformers 5.x (tested 5.25.0), PEFT >= 0.17 for loading adapters (tested
0.21.2), torch 2.x (tested 2.15.0). transformers 4.x is not supported (its experts take dense
``[T, E]`` routing weights and ``[B, S, H]`` inputs); adapters trained on 4.x load (see
``lora_orientation``).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import autograd as _ag
from ._native import MxmoeError

try:
    import transformers as _transformers
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("mxmoe.gpt_oss needs transformers >= 5 (pip install 'transformers>=5,<6')") from e

_TRANSFORMERS_MAJOR = int(_transformers.__version__.split(".")[0])
if _TRANSFORMERS_MAJOR < 5:
    raise ImportError(
        f"mxmoe.gpt_oss supports transformers 5.x; found {_transformers.__version__} (4.x passes dense "
        "[T, E] routing weights to its experts and has no experts-implementation hook)"
    )

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

try:  # PEFT is optional: only the LoRA helpers need it.
    import peft as _peft
    from peft.tuners.lora import LoraLayer as _LoraLayer
except ImportError:  # pragma: no cover - exercised only without peft
    _peft = None
    _LoraLayer = None

__all__ = [
    "SUPPORTED",
    "IMPLEMENTATION",
    "MxGptOssExperts",
    "MxLoraExperts",
    "experts_forward",
    "mxmoe_experts_forward",
    "from_pretrained",
    "convert",
    "enable_gradient_checkpointing",
    "get_peft_model",
    "add_adapter",
    "load_adapter",
    "peft_lora_b_to_mxmoe",
    "mxmoe_lora_b_to_peft",
    "blocks_to_packed",
    "packed_to_blocks",
    "swap_lora_orientation",
    "lora_orientation",
    "torch_clamp_boundary",
]

SUPPORTED = {
    "transformers": ">=5.0,<6 (tested 5.25.0)",
    "peft": ">=0.17 to load adapters, tested 0.21.2",
    "torch": "tested 2.15.0",
}
IMPLEMENTATION = "mxmoe"
GATE_UP = "gate_up_proj"
DOWN = "down_proj"
PROJECTIONS = (GATE_UP, DOWN)
DEFAULT_ALPHA = 1.702
DEFAULT_LIMIT = 7.0

_EXPERT_KEY = re.compile(r"^(?P<module>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<part>_blocks|_scales|_bias|)$")


# ---------------------------------------------------------------------------------------------
# Layout helpers.


def _check_b(b: torch.Tensor, num_experts: int, what: str) -> Tuple[int, int]:
    if b.dim() != 2:
        raise ValueError(f"{what}: expected a rank-2 [out, E*r] tensor, got shape {list(b.shape)}")
    if num_experts <= 0 or b.shape[1] % num_experts != 0 or b.shape[1] == 0:
        raise ValueError(
            f"{what}: {b.shape[1]} columns is not a positive multiple of num_experts = {num_experts}"
        )
    return b.shape[0], b.shape[1] // num_experts


def peft_lora_b_to_mxmoe(b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """PEFT's rank-major LoRA B ``[out, E*r]`` (expert e's columns are ``e::E``, i.e. column
    ``j*E + e``) to mxmoe's expert-major B (column ``e*r + j``). Differentiable (a view/permute)."""
    n, r = _check_b(b, num_experts, "lora_B")
    return b.reshape(n, r, num_experts).permute(0, 2, 1).reshape(n, num_experts * r)


def mxmoe_lora_b_to_peft(b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """mxmoe's expert-major LoRA B ``[out, E*r]`` to PEFT's rank-major layout (inverse of
    ``peft_lora_b_to_mxmoe``)."""
    n, r = _check_b(b, num_experts, "lora_B")
    return b.reshape(n, num_experts, r).permute(0, 2, 1).reshape(n, num_experts * r)


def blocks_to_packed(blocks: torch.Tensor) -> torch.Tensor:
    """The checkpoint's ``*_blocks [E, N, K/32, 16]`` (uint8) as mxmoe's ``packed [E, N, K/2]``
    (the same bytes: a view for contiguous input; low nibble = even k)."""
    if blocks.dtype != torch.uint8:
        raise ValueError(f"blocks: expected uint8, got {blocks.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != 16:
        raise ValueError(f"blocks: expected [E, N, K/32, 16], got shape {list(blocks.shape)}")
    e, n, g, _ = blocks.shape
    return blocks.reshape(e, n, g * 16)


def packed_to_blocks(packed: torch.Tensor) -> torch.Tensor:
    """mxmoe's ``packed [E, N, K/2]`` as the checkpoint's ``*_blocks [E, N, K/32, 16]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected uint8, got {packed.dtype}")
    if packed.dim() != 3 or packed.shape[-1] % 16 != 0:
        raise ValueError(f"packed: expected [E, N, K/2] with K a multiple of 32, got {list(packed.shape)}")
    e, n, half = packed.shape
    return packed.reshape(e, n, half // 16, 16)


def swap_lora_orientation(
    a: torch.Tensor, b: torch.Tensor, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Converts a PEFT expert LoRA between the two orientations PEFT versions have used for a
    3-D parameter ``[E, d1, d2]`` (GPT_OSS.md §3): ``(A [E*r, d_a], B [d_b, E*r])`` becomes
    ``(A' [E*r, d_b], B' [d_a, E*r])`` with the same per-expert ``ΔW``. Its own inverse."""
    if a.dim() != 2:
        raise ValueError(f"lora_A: expected a rank-2 [E*r, in] tensor, got shape {list(a.shape)}")
    d_b, r = _check_b(b, num_experts, "lora_B")
    if a.shape[0] != num_experts * r:
        raise ValueError(f"lora_A: {a.shape[0]} rows, lora_B has E*r = {num_experts * r} columns")
    d_a = a.shape[1]
    new_a = b.reshape(d_b, r, num_experts).permute(2, 1, 0).reshape(num_experts * r, d_b)
    new_b = a.reshape(num_experts, r, d_a).permute(2, 1, 0).reshape(d_a, r * num_experts)
    return new_a, new_b


def _release(version: str) -> Tuple[int, int, int]:
    nums = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
    while len(nums) < 3:
        nums.append(0)
    return tuple(nums)  # type: ignore[return-value]


def lora_orientation(peft_version: str, transformers_version: Union[str, int] = 5) -> str:
    """Which orientation a PEFT ``target_parameters`` adapter of gpt-oss experts has:
    ``"standard"`` (A ``[E*r, d1]``, B ``[d2, E*r]`` for the parameter ``[E, d1, d2]``, what
    transformers 5.x with PEFT >= 0.19.1 and every PEFT 0.17/0.18 write, and what mxmoe writes) or
    ``"swapped"`` (A ``[E*r, d2]``, B ``[d1, E*r]``: PEFT >= 0.19.1 on transformers 4.x, whose
    experts lack ``is_transposed``, and PEFT 0.19.0 on 5.x)."""
    p = _release(str(peft_version))
    t = _release(str(transformers_version))[0]
    if p < (0, 17, 0):
        raise ValueError(f"PEFT {peft_version} predates target_parameters (0.17.0); no expert LoRA")
    if p < (0, 19, 0):
        return "standard"
    if p < (0, 19, 1):
        return "swapped" if t >= 5 else "standard"
    return "swapped" if t < 5 else "standard"


torch_clamp_boundary = _ag.torch_clamp_boundary


# ---------------------------------------------------------------------------------------------
# The functional block.

Weights = _ag.Weights
Lora = Tuple[torch.Tensor, torch.Tensor, float]


def _weights_dims(w: Weights, what: str) -> Tuple[int, int, int]:
    if isinstance(w, torch.Tensor):
        if w.dim() != 3:
            raise ValueError(f"{what}: expected a dense [E, N, K] tensor, got shape {list(w.shape)}")
        return tuple(w.shape)  # type: ignore[return-value]
    if len(w) not in (2, 3):
        raise ValueError(
            f"{what}: expected a dense tensor, (packed, scales) for MXFP4 or (packed, scales, "
            f"tensor_scales) for NVFP4, got a sequence of {len(w)}"
        )
    packed, scales = w[0], w[1]
    block = 32 if len(w) == 2 else 16
    if packed.dtype != torch.uint8 or packed.dim() != 3:
        raise ValueError(f"{what}: expected packed uint8 [E, N, K/2], got {packed.dtype} {list(packed.shape)}")
    e, n, half = packed.shape
    if tuple(scales.shape) != (e, n, 2 * half // block):
        raise ValueError(
            f"{what}: scales shape {list(scales.shape)} does not match packed {list(packed.shape)} "
            f"(expected [{e}, {n}, {2 * half // block}])"
        )
    return e, n, 2 * half


def _combine_lora(
    loras: Optional[Sequence[Lora]], e: int, k: int, n: int, what: str
) -> Optional[Lora]:
    """Checks PEFT-layout LoRAs ``(A [E*r, K], B [N, E*r] rank-major, s)`` and returns one LoRA in
    mxmoe's layout ``(A, B expert-major, s)``: several active adapters are concatenated along the
    rank (their scalings folded into B), which is the sum of their updates."""
    if not loras:
        return None
    converted = []
    for i, lora in enumerate(loras):
        if len(lora) != 3:
            raise ValueError(f"{what} LoRA {i}: expected (A, B, scaling)")
        a, b, s = lora
        if a.dim() != 2 or a.shape[1] != k or a.shape[0] % e != 0 or a.shape[0] == 0:
            raise ValueError(
                f"{what} LoRA {i}: A must be [E*r, {k}] with E = {e}, got shape {list(a.shape)}"
            )
        r = a.shape[0] // e
        if tuple(b.shape) != (n, e * r):
            raise ValueError(f"{what} LoRA {i}: B must be [{n}, {e * r}] (PEFT layout), got {list(b.shape)}")
        converted.append((a, peft_lora_b_to_mxmoe(b, e), float(s), r))
    if len(converted) == 1:
        a, b, s, _ = converted[0]
        return a, b, s
    a = torch.cat([a.reshape(e, r, k) for a, _, _, r in converted], dim=1).reshape(-1, k)
    b = torch.cat([(b * s).reshape(n, e, r) for _, b, s, r in converted], dim=2).reshape(n, -1)
    return a, b, 1.0


def _eager(hidden, ids, weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, gu_lora, dn_lora,
           allow_nan_scales):
    """transformers' eager ``GptOssExperts.forward`` on dequantized experts, with factored LoRA;
    autograd through torch (dx, d_gates, dA, dB)."""
    dtype = hidden.dtype
    e_count = gate_up.shape[0] if isinstance(gate_up, torch.Tensor) else gate_up[0].shape[0]
    out = torch.zeros_like(hidden)
    with torch.no_grad():
        hit = torch.unique(ids[(ids >= 0) & (ids < e_count)]).tolist()
    for e in hit:
        token_idx, top_k_pos = torch.where(ids == e)
        x = hidden[token_idx]
        w_gu = _ag.eager_expert_weight(gate_up, e, dtype, allow_nan_scales)
        z = _ag.eager_projection(x, w_gu, gate_up_bias[e].to(dtype), gu_lora, e, e_count)
        gate, up = z[..., ::2], z[..., 1::2]
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        glu = gate * torch.sigmoid(gate * alpha)
        h = (up + 1) * glu
        w_dn = _ag.eager_expert_weight(down, e, dtype, allow_nan_scales)
        o = _ag.eager_projection(h, w_dn, down_bias[e].to(dtype), dn_lora, e, e_count)
        weighted = o * weights[token_idx, top_k_pos, None].to(dtype)
        out.index_add_(0, token_idx, weighted.to(out.dtype))
    return out


def _moe_block_has_gpt_oss() -> bool:
    return "activation" in inspect.signature(_ag.moe_block).parameters


def experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Weights,
    down: Weights,
    gate_up_bias: torch.Tensor,
    down_bias: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    limit: float = DEFAULT_LIMIT,
    gate_up_lora: Optional[Sequence[Lora]] = None,
    down_lora: Optional[Sequence[Lora]] = None,
    strategy: str = "auto",
    allow_nan_scales: bool = False,
) -> torch.Tensor:
    """The gpt-oss expert block, ``y [T, H]``.

    ``gate_up`` is ``(packed [E, 2I, H/2], scales [E, 2I, H/32])`` (MXFP4), ``(packed, scales
    [E, 2I, H/16], tensor_scales)`` (NVFP4, ``mxmoe.Nvfp4Weights``) or a dense ``[E, 2I, H]``
    tensor (rows interleaved as in the checkpoint: 2i gate, 2i+1 up); ``down`` is ``[E, H, I]``
    likewise. Quantized weights are dequantized per expert on the CPU. ``*_lora`` are sequences of PEFT-layout ``(A [E*r, in], B [out, E*r] rank-major,
    scaling)`` (the active adapters; may be empty). Ids ``< 0`` or ``>= E`` are dropped slots.
    On CUDA this is ``mxmoe.moe_block(..., activation="gpt_oss")`` (bf16 compute; x, LoRA and
    biases are cast to bf16, the result back to ``hidden_states.dtype``); on the CPU it is the
    eager formula in ``hidden_states.dtype``. The weights and biases are frozen (no gradients)."""
    e, two_i, h = _weights_dims(gate_up, "gate_up")
    e2, h2, i = _weights_dims(down, "down")
    if e2 != e or h2 != h or two_i != 2 * i:
        raise ValueError(
            f"gate_up [E, 2I, H] = [{e}, {two_i}, {h}] and down [E, H, I] = [{e2}, {h2}, {i}] disagree"
        )
    if hidden_states.dim() != 2 or hidden_states.shape[1] != h:
        raise ValueError(f"hidden_states: expected [T, {h}], got shape {list(hidden_states.shape)}")
    t = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != t:
        raise ValueError(f"top_k_index: expected [{t}, k], got shape {list(top_k_index.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index: expected an integer tensor, got {top_k_index.dtype}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(
            f"top_k_weights: expected shape {list(top_k_index.shape)} (as top_k_index), got "
            f"{list(top_k_weights.shape)}"
        )
    if not top_k_weights.dtype.is_floating_point:
        raise ValueError(f"top_k_weights: expected a floating tensor, got {top_k_weights.dtype}")
    if tuple(gate_up_bias.shape) != (e, two_i) or tuple(down_bias.shape) != (e, h):
        raise ValueError(
            f"biases: expected gate_up_bias [{e}, {two_i}] and down_bias [{e}, {h}], got "
            f"{list(gate_up_bias.shape)} and {list(down_bias.shape)}"
        )
    gu_lora = _combine_lora(gate_up_lora, e, h, two_i, "gate_up")
    dn_lora = _combine_lora(down_lora, e, i, h, "down")

    if hidden_states.device.type != "cuda":
        return _eager(hidden_states, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias,
                      alpha, limit, gu_lora, dn_lora, allow_nan_scales)

    if not _moe_block_has_gpt_oss():
        raise MxmoeError(
            "this mxmoe build's moe_block has no activation= argument (the gpt-oss block); "
            "rebuild and reinstall the mxmoe wheel"
        )
    if t == 0:
        return torch.zeros_like(hidden_states)
    bf16 = torch.bfloat16
    x = hidden_states.to(bf16)
    ids = top_k_index.to(torch.int64)
    ids = torch.where((ids < 0) | (ids >= e), torch.full_like(ids, -1), ids)
    gates = top_k_weights.to(bf16)  # the kernel reads bf16 gates (d_gates flows back through the cast)

    def weights_arg(w):
        if isinstance(w, torch.Tensor):
            return w.to(bf16)
        return w

    def lora_arg(lora):
        if lora is None:
            return None
        a, b, s = lora
        return a.to(bf16), b.to(bf16), s

    y = _ag.moe_block(
        x,
        ids,
        gates,
        weights_arg(gate_up),
        weights_arg(down),
        gate_up_lora=lora_arg(gu_lora),
        down_lora=lora_arg(dn_lora),
        limit=float(limit),
        strategy=strategy,
        activation="gpt_oss",
        alpha=float(alpha),
        clamp_boundary=torch_clamp_boundary(),
        gate_up_bias=gate_up_bias.detach().to(bf16),
        down_bias=down_bias.detach().to(bf16),
        allow_nan_scales=allow_nan_scales,
    )
    return y.to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------
# The experts module.


class MxGptOssExperts(nn.Module):
    """gpt-oss experts with MXFP4 weights resident (drop-in for transformers' ``GptOssExperts``).

    Buffers (named as the checkpoint's tensors, so ``state_dict`` keys equal the checkpoint keys):
    ``gate_up_proj_blocks`` uint8 ``[E, 2I, H/32, 16]``, ``gate_up_proj_scales`` uint8
    ``[E, 2I, H/32]``, ``gate_up_proj_bias`` ``[E, 2I]``; ``down_proj_blocks`` ``[E, H, I/32, 16]``,
    ``down_proj_scales`` ``[E, H, I/32]``, ``down_proj_bias`` ``[E, H]``. Rows of gate_up are
    interleaved (2i gate, 2i+1 up). Everything is frozen; LoRA comes from ``MxLoraExperts`` (PEFT)
    or the ``gate_up_lora`` / ``down_lora`` arguments of ``forward``."""

    is_transposed = True  # PEFT reads this: expert LoRA in the standard (transformers 5.x) orientation
    has_bias = True
    has_gate = True
    is_concatenated = False

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        alpha: float = DEFAULT_ALPHA,
        limit: float = DEFAULT_LIMIT,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        strategy: str = "auto",
        allow_nan_scales: bool = False,
    ):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if hidden_size % 32 or intermediate_size % 32:
            raise ValueError(
                f"hidden_size ({hidden_size}) and intermediate_size ({intermediate_size}) must be "
                "multiples of the MX block size 32"
            )
        if limit is None or not limit > 0:
            raise ValueError(f"limit (swiglu_limit) must be positive, got {limit!r}")
        e, h, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.alpha, self.limit = float(alpha), float(limit)
        self.strategy, self.allow_nan_scales = strategy, allow_nan_scales
        self._checked_scales = None
        u8 = torch.uint8
        self.register_buffer("gate_up_proj_blocks", torch.zeros((e, 2 * i, h // 32, 16), dtype=u8, device=device))
        self.register_buffer("gate_up_proj_scales", torch.full((e, 2 * i, h // 32), 127, dtype=u8, device=device))
        self.register_buffer("gate_up_proj_bias", torch.zeros((e, 2 * i), dtype=dtype, device=device))
        self.register_buffer("down_proj_blocks", torch.zeros((e, h, i // 32, 16), dtype=u8, device=device))
        self.register_buffer("down_proj_scales", torch.full((e, h, i // 32), 127, dtype=u8, device=device))
        self.register_buffer("down_proj_bias", torch.zeros((e, h), dtype=dtype, device=device))

    @classmethod
    def from_config(cls, config, *, dtype: torch.dtype = torch.bfloat16, device=None, **kwargs) -> "MxGptOssExperts":
        """Empty experts (zero codes, scale 1, zero biases) for a ``GptOssConfig``; ``alpha`` and
        ``limit`` from ``swiglu_alpha`` / ``swiglu_limit`` (defaults 1.702 / 7.0)."""
        return cls(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            alpha=getattr(config, "swiglu_alpha", DEFAULT_ALPHA) or DEFAULT_ALPHA,
            limit=getattr(config, "swiglu_limit", DEFAULT_LIMIT) or DEFAULT_LIMIT,
            dtype=dtype,
            device=device,
            **kwargs,
        )

    @classmethod
    def from_dense(cls, experts: nn.Module, *, require_exact: bool = True, **kwargs) -> "MxGptOssExperts":
        """Quantizes a dense ``GptOssExperts`` (``gate_up_proj [E, H, 2I]``, ``down_proj
        [E, I, H]``) with ``mxmoe.quantize`` (bit-exact torchao FLOOR), on its device. With
        ``require_exact`` (default) raises ``ValueError`` unless the weights are MXFP4 values (as
        when they were dequantized from a gpt-oss checkpoint), so the conversion changes nothing."""
        if nn.utils.parametrize.is_parametrized(experts):
            raise MxmoeError(
                "these experts carry a PEFT target_parameters LoRA (parametrized); convert the model "
                "before get_peft_model, then use mxmoe.gpt_oss.get_peft_model"
            )
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        e, h, two_i = gu.shape
        bias_dtype = experts.gate_up_proj_bias.dtype
        alpha = getattr(experts, "alpha", DEFAULT_ALPHA)
        limit = getattr(experts, "limit", DEFAULT_LIMIT)
        m = cls(e, h, two_i // 2, alpha=alpha, limit=limit, dtype=bias_dtype, device=gu.device, **kwargs)
        for proj, w in ((GATE_UP, gu), (DOWN, dn)):
            w_nk = w.transpose(1, 2)  # [E, N, K], the checkpoint's orientation
            packed, scales = _ag.quantize(w_nk)
            if require_exact:
                cmp_dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float32) else torch.float32
                back = _ag.dequantize(packed.cpu(), scales.cpu(), cmp_dtype, allow_nan_scales=True)
                diff = (back.float() - w_nk.detach().cpu().float()).abs()
                if not bool(torch.equal(back, w_nk.detach().cpu().to(cmp_dtype))):
                    raise ValueError(
                        f"{proj}: the weights are not MXFP4 values (max |Δ| = {diff.max().item():.3g} "
                        "after re-quantization); they did not come from an MXFP4 checkpoint. Pass "
                        "require_exact=False to accept MXFP4 rounding"
                    )
            getattr(m, proj + "_blocks").copy_(packed_to_blocks(packed.to(gu.device)))
            getattr(m, proj + "_scales").copy_(scales.to(gu.device))
        m.gate_up_proj_bias.copy_(experts.gate_up_proj_bias.detach())
        m.down_proj_bias.copy_(experts.down_proj_bias.detach())
        return m

    # -- views -------------------------------------------------------------------------------

    @property
    def gate_up_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(packed [E, 2I, H/2], scales [E, 2I, H/32])``, mxmoe's layout (views)."""
        return blocks_to_packed(self.gate_up_proj_blocks), self.gate_up_proj_scales

    @property
    def down_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(packed [E, H, I/2], scales [E, H, I/32])``."""
        return blocks_to_packed(self.down_proj_blocks), self.down_proj_scales

    def dense_weights(self, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj [E, H, 2I], down_proj [E, I, H])`` in transformers' dense layout
        (materialises all experts: for export and tests, not for training)."""
        gu = _ag.dequantize(*self.gate_up_weights, dtype=dtype, allow_nan_scales=self.allow_nan_scales)
        dn = _ag.dequantize(*self.down_weights, dtype=dtype, allow_nan_scales=self.allow_nan_scales)
        return gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()

    def _check_scales_once(self) -> None:
        if self.allow_nan_scales:
            return
        key = tuple((b.data_ptr(), b._version) for b in (self.gate_up_proj_scales, self.down_proj_scales))
        if key != self._checked_scales:
            _ag.check_scales(self.gate_up_proj_scales, "gate_up_proj_scales")
            _ag.check_scales(self.down_proj_scales, "down_proj_scales")
            self._checked_scales = key

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        gate_up_lora: Optional[Sequence[Lora]] = None,
        down_lora: Optional[Sequence[Lora]] = None,
    ) -> torch.Tensor:
        """``hidden_states [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` (the router's
        outputs) to ``[T, H]``. ``*_lora``: PEFT-layout ``(A, B, scaling)`` sequences."""
        self._check_scales_once()
        return experts_forward(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_weights,
            self.down_weights,
            self.gate_up_proj_bias,
            self.down_proj_bias,
            alpha=self.alpha,
            limit=self.limit,
            gate_up_lora=gate_up_lora,
            down_lora=down_lora,
            strategy=self.strategy,
            allow_nan_scales=True,
        )

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"alpha={self.alpha}, limit={self.limit}, strategy={self.strategy!r}, MXFP4")


# ---------------------------------------------------------------------------------------------
# transformers: the "mxmoe" experts implementation.


def mxmoe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The function registered as ``experts_implementation="mxmoe"``. On ``MxGptOssExperts`` it
    is its forward; on a stock dense ``GptOssExperts`` it runs mxmoe's gpt-oss block with the dense
    weights as they are (bf16 on CUDA, no quantization, frozen: the weights get no gradient)."""
    if isinstance(self, MxGptOssExperts):
        return self(hidden_states, top_k_index, top_k_weights)
    if not isinstance(self, GptOssExperts):
        raise MxmoeError(
            f"the 'mxmoe' experts implementation supports gpt-oss experts only, got {type(self).__name__}"
        )
    if nn.utils.parametrize.is_parametrized(self):
        raise MxmoeError(
            "experts_implementation='mxmoe' cannot run a stock PEFT target_parameters LoRA (its "
            "gradient would be lost); use mxmoe.gpt_oss.convert(model) and mxmoe.gpt_oss.get_peft_model"
        )
    params = (self.gate_up_proj, self.gate_up_proj_bias, self.down_proj, self.down_proj_bias)
    if hidden_states.device.type == "cuda" and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise MxmoeError(
            "experts_implementation='mxmoe' keeps the expert weights frozen, but they require grad; "
            "freeze them (e.g. model.requires_grad_(False) or PEFT) or use another implementation"
        )
    return experts_forward(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj.transpose(1, 2).contiguous(),
        self.down_proj.transpose(1, 2).contiguous(),
        self.gate_up_proj_bias,
        self.down_proj_bias,
        alpha=getattr(self, "alpha", DEFAULT_ALPHA),
        limit=getattr(self, "limit", DEFAULT_LIMIT),
    )


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, mxmoe_experts_forward)


def _set_experts_implementation(model: nn.Module) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        try:
            setter(IMPLEMENTATION)
        except (ValueError, RuntimeError):  # pragma: no cover - older 5.x without the setter's checks
            model.config._experts_implementation = IMPLEMENTATION


def _parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def convert(model: nn.Module, *, require_exact: bool = True, strategy: str = "auto") -> nn.Module:
    """Replaces every ``GptOssExperts`` of ``model`` by ``MxGptOssExperts`` (in place, layer by
    layer, freeing each dense layer after it is quantized) and sets the model's experts
    implementation to ``"mxmoe"``. ``require_exact``: see ``MxGptOssExperts.from_dense``. Call it
    before ``get_peft_model``. Returns ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, GptOssExperts)]
    if not names and not any(isinstance(m, MxGptOssExperts) for m in model.modules()):
        raise ValueError("convert: the model has no gpt-oss experts (GptOssExperts)")
    for name in names:
        parent, attr = _parent(model, name)
        dense = getattr(parent, attr)
        setattr(parent, attr, MxGptOssExperts.from_dense(dense, require_exact=require_exact, strategy=strategy))
        del dense
    _set_experts_implementation(model)
    return model


def enable_gradient_checkpointing(model: nn.Module, *, use_reentrant: bool = False) -> nn.Module:
    """Turns on transformers' gradient (activation) checkpointing of the decoder layers of
    ``model`` (a transformers model or a ``PeftModel`` around one), under either name transformers
    5.x uses (``activation_checkpointing_enable`` from 5.25, ``gradient_checkpointing_enable``
    before). With ``use_reentrant=True`` the inputs are made to require grad (PEFT needs that).
    The expert block then runs twice per step (forward, and again in backward). Returns ``model``."""
    base = model
    while not hasattr(base, "gradient_checkpointing_enable") and hasattr(base, "base_model"):
        base = base.base_model
    if not hasattr(base, "gradient_checkpointing_enable"):
        base = getattr(base, "model", base)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        base.enable_input_require_grads()
    return model


# ---------------------------------------------------------------------------------------------
# Loading from a checkpoint.


def _checkpoint_folder(path: Union[str, os.PathLike], revision: Optional[str], local_files_only: bool) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"{path!r} is not a folder and huggingface_hub is not installed") from e
    return snapshot_download(
        path,
        revision=revision,
        local_files_only=local_files_only,
        allow_patterns=["*.json", "model*.safetensors", "*.jinja", "tokenizer*"],
    )


def _shard_files(folder: str) -> List[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{folder}: neither model.safetensors.index.json nor model.safetensors")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
    """Sets parameter or buffer ``key`` of ``model`` to ``tensor`` (cast to the dtype the model
    declared), replacing the meta placeholder. Returns False for an unknown key."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    if attr in module._parameters and module._parameters[attr] is not None:
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: checkpoint shape {list(tensor.shape)}, model expects {list(old.shape)}")
        module._parameters[attr] = nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad)
        return True
    if attr in module._buffers and module._buffers[attr] is not None:
        old = module._buffers[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: checkpoint shape {list(tensor.shape)}, model expects {list(old.shape)}")
        module._buffers[attr] = tensor.to(old.dtype)
        return True
    return False


def _load_expert_tensor(experts: MxGptOssExperts, key: str, proj: str, part: str, tensor: torch.Tensor,
                        require_exact: bool) -> List[str]:
    """Puts one checkpoint tensor into ``experts``; returns the buffer names it filled."""
    if part in ("_blocks", "_scales", "_bias"):
        name = proj + part
        old = experts._buffers[name]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: checkpoint shape {list(tensor.shape)}, expected {list(old.shape)}")
        if part == "_bias":
            tensor = tensor.to(old.dtype)
        elif tensor.dtype != torch.uint8:
            raise ValueError(f"{key}: expected uint8 MXFP4 bytes, got {tensor.dtype}")
        experts._buffers[name] = tensor
        return [name]
    # A dense (bf16) checkpoint tensor [E, in, out]: quantize it (value-exact when it came from MXFP4).
    e, n_rows = experts.num_experts, (2 * experts.intermediate_size if proj == GATE_UP else experts.hidden_size)
    k = experts.hidden_size if proj == GATE_UP else experts.intermediate_size
    if tuple(tensor.shape) != (e, k, n_rows):
        raise ValueError(f"{key}: checkpoint shape {list(tensor.shape)}, expected {[e, k, n_rows]}")
    w_nk = tensor.transpose(1, 2)
    packed, scales = _ag.quantize(w_nk)
    if require_exact:
        back = _ag.dequantize(packed.cpu(), scales.cpu(), torch.float32, allow_nan_scales=True)
        if not torch.equal(back, w_nk.cpu().float()):
            raise ValueError(
                f"{key}: dense expert weights that are not MXFP4 values; pass require_exact=False "
                "to quantize them anyway (MXFP4 rounding)"
            )
    experts._buffers[proj + "_blocks"] = packed_to_blocks(packed).to(tensor.device)
    experts._buffers[proj + "_scales"] = scales.to(tensor.device)
    return [proj + "_blocks", proj + "_scales"]


def _rebuild_rotary(model: nn.Module, device) -> None:
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent, attr = _parent(model, name)
            with torch.device(device):
                fresh = type(module)(config=module.config)
            setattr(parent, attr, fresh)


def from_pretrained(
    path: Union[str, os.PathLike],
    *,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: Optional[str] = None,
    strategy: str = "auto",
    require_exact: bool = True,
    config=None,
    revision: Optional[str] = None,
    local_files_only: bool = False,
):
    """Loads a gpt-oss checkpoint (a folder or a Hub id such as ``"openai/gpt-oss-20b"``) as a
    ``GptOssForCausalLM`` with ``MxGptOssExperts``: the model is built on the meta device, the
    experts' buffers are taken straight from the checkpoint's ``*_blocks`` / ``*_scales`` /
    ``*_bias`` tensors (``safetensors.safe_open``, one tensor at a time, directly onto ``device``),
    and every other tensor is loaded in the dtype the model declares for ``dtype`` (bf16). A dense
    checkpoint (expert ``gate_up_proj`` / ``down_proj`` tensors, e.g. a bf16 export) is quantized
    tensor by tensor (``require_exact``: see ``MxGptOssExperts.from_dense``).

    ``device`` defaults to ``"cuda"`` when available, else ``"cpu"`` (the CPU runs the eager
    fallback). ``attn_implementation`` is passed to transformers (``"eager"`` is what the gpt-oss
    recipes train with; sinks need it or a kernel that supports them). Raises ``ValueError`` for a
    checkpoint that is not gpt-oss, misses tensors or has wrong shapes."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _checkpoint_folder(path, revision, local_files_only)
    if config is None:
        config = AutoConfig.from_pretrained(folder)
    else:
        config = copy.deepcopy(config)
    if getattr(config, "model_type", None) != "gpt_oss":
        raise ValueError(f"{path}: model_type {getattr(config, 'model_type', None)!r}, expected 'gpt_oss'")
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        method = getattr(method, "value", method)
        if method != "mxfp4":
            raise ValueError(f"{path}: quantization {method!r} is not MXFP4; mxmoe loads MXFP4 or dense checkpoints")
        del config.quantization_config  # the experts are mxmoe's; the rest is dense
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    kwargs = {"dtype": dtype, "experts_implementation": "eager"}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        experts: Dict[str, MxGptOssExperts] = {}
        for name in [n for n, m in model.named_modules() if isinstance(m, GptOssExperts)]:
            parent, attr = _parent(model, name)
            old = getattr(parent, attr)
            new = MxGptOssExperts.from_config(config, dtype=old.gate_up_proj_bias.dtype, strategy=strategy)
            setattr(parent, attr, new)
            experts[name] = new
    filled: Dict[str, set] = {name: set() for name in experts}
    unexpected: List[str] = []
    for file in _shard_files(folder):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                m = _EXPERT_KEY.match(key)
                if m is not None and m.group("module") in experts:
                    name = m.group("module")
                    filled[name].update(_load_expert_tensor(
                        experts[name], key, m.group("proj"), m.group("part"), f.get_tensor(key), require_exact))
                elif not _assign(model, key, f.get_tensor(key)):
                    unexpected.append(key)
    _rebuild_rotary(model, device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors: {missing[:8]}")
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} checkpoint tensors were not used: {unexpected[:8]}", stacklevel=2)
    _set_experts_implementation(model)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError):
        pass
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# PEFT.


def _require_peft():
    if _peft is None:
        raise ImportError("the LoRA helpers of mxmoe.gpt_oss need PEFT (pip install 'peft>=0.17')")
    return _peft


def _check_lora_config(config) -> None:
    """The restrictions of PEFT's ``ParamWrapper`` (expert LoRA), as typed errors."""
    if getattr(config, "lora_dropout", 0.0):
        raise ValueError("expert LoRA needs lora_dropout=0 (as PEFT's target_parameters)")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"expert LoRA does not support {flag}=True (as PEFT's target_parameters)")
    for field in ("velora_config", "kasa_config"):
        if getattr(config, field, None) is not None:
            raise ValueError(f"expert LoRA does not support {field}")
    init = getattr(config, "init_lora_weights", True)
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise ValueError(
            f"init_lora_weights={init!r} needs the dense base weight; MXFP4 experts support True, "
            "False and 'gaussian'"
        )


if _LoraLayer is not None:

    class MxLoraExperts(nn.Module, _LoraLayer):
        """A PEFT ``LoraLayer`` holding the expert LoRA of one projection (``parameter_name`` =
        ``"gate_up_proj"`` or ``"down_proj"``) of an ``MxGptOssExperts``, in PEFT's
        ``ParamWrapper`` layout: ``lora_A[adapter].weight [E*r, in]`` (expert-major),
        ``lora_B[adapter].weight [out, E*r]`` (rank-major), scaling ``alpha / r`` (``/ sqrt(r)``
        with rslora). Two projections nest (outer = down, ``base_layer`` = gate_up) as PEFT nests
        its wrappers, so state-dict keys equal PEFT's. The outermost layer's forward collects the
        active adapters of the chain and runs the fused block once."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, config,
                     r: int = 0, lora_alpha: float = 1, **kwargs) -> None:
            if parameter_name not in PROJECTIONS:
                raise ValueError(f"parameter_name must be one of {PROJECTIONS}, got {parameter_name!r}")
            self.parameter_name = parameter_name
            nn.Module.__init__(self)
            _LoraLayer.__init__(self, base_layer, **kwargs)
            _check_lora_config(config)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def experts(self) -> MxGptOssExperts:
            base = self.get_base_layer()
            if not isinstance(base, MxGptOssExperts):
                raise MxmoeError(f"MxLoraExperts wraps {type(base).__name__}, expected MxGptOssExperts")
            return base

        def _get_in_out_features(self, module):
            if not isinstance(module, MxGptOssExperts):
                raise ValueError(f"MxLoraExperts needs MxGptOssExperts below it, got {type(module).__name__}")
            self.num_experts = module.num_experts
            h, i = module.hidden_size, module.intermediate_size
            return (h, 2 * i) if self.parameter_name == GATE_UP else (i, h)

        def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
            _check_lora_config(config)
            e = self.num_experts
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.lora_dropout.update(nn.ModuleDict({adapter_name: nn.Identity()}))
            self.lora_A[adapter_name] = nn.Linear(self.in_features, r * e, bias=False)
            self.lora_B[adapter_name] = nn.Linear(r * e, self.out_features, bias=False)
            self.lora_bias[adapter_name] = False
            self.use_rslora[adapter_name] = bool(config.use_rslora)
            self.use_dora[adapter_name] = False
            self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
            experts = self.experts()
            dtype = experts.gate_up_proj_bias.dtype
            dtype = dtype if dtype.is_floating_point and not experts.gate_up_proj_bias.is_meta else torch.bfloat16
            device = experts.gate_up_proj_blocks.device
            for d in (self.lora_A, self.lora_B):
                d[adapter_name] = d[adapter_name].to(device=device, dtype=dtype)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

        def chain(self) -> List["MxLoraExperts"]:
            """The LoRA layers from this one inward."""
            out, layer = [], self
            while isinstance(layer, MxLoraExperts):
                out.append(layer)
                layer = layer.base_layer
            return out

        def _active_loras(self) -> List[Lora]:
            if self.disable_adapters or self.merged:
                return []
            return [(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a])
                    for a in self.active_adapters if a in self.lora_A]

        def forward(self, hidden_states, top_k_index=None, top_k_weights=None, *args, **kwargs):
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("MxLoraExperts: mixed-adapter batches (adapter_names=...) are not supported")
            if args or kwargs:
                raise TypeError(f"MxLoraExperts.forward: unexpected arguments {list(kwargs) or len(args)}")
            loras = {GATE_UP: [], DOWN: []}
            for layer in self.chain():
                loras[layer.parameter_name].extend(layer._active_loras())
            return self.experts()(hidden_states, top_k_index, top_k_weights,
                                  gate_up_lora=loras[GATE_UP], down_lora=loras[DOWN])

        def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
            """The dense per-expert update ``[E, in, out]`` in transformers' parameter layout
            (``ΔW_e = s (B_e A_e)ᵀ``), as PEFT's ParamWrapper computes it. Materialises E·in·out."""
            e = self.num_experts
            a = self.lora_A[adapter_name].weight.reshape(e, -1, self.in_features)
            b = self.lora_B[adapter_name].weight.reshape(self.out_features, -1, e)
            return torch.einsum("o r e, e r i -> e i o", b, a) * self.scaling[adapter_name]

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise MxmoeError(
                "a LoRA cannot be merged into MXFP4 experts without re-quantizing them; save the "
                "adapter and merge it into the dense model with stock transformers + PEFT"
            )

        def unmerge(self) -> None:
            return None

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

else:  # pragma: no cover - without PEFT

    class MxLoraExperts:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            _require_peft()


def _expert_chains(root: nn.Module) -> Dict[str, nn.Module]:
    """``{module path: outermost module}`` for every ``MxGptOssExperts`` (wrapped or not)."""
    out = {}
    for name, m in root.named_modules():
        if isinstance(m, MxGptOssExperts):
            top = name
            while top.endswith(".base_layer"):
                top = top[: -len(".base_layer")]
            out[top] = root.get_submodule(top)
    return out


def _match_targets(root: nn.Module, target_parameters) -> Tuple[Dict[str, List[str]], List[str]]:
    """Splits ``target_parameters`` into expert targets ``{module path: [projections, gate_up
    first]}`` (PEFT's matching rule: the key ``<path>.<param>`` equals or ends with ``.<target>``)
    and the remaining targets (for PEFT)."""
    targets: Dict[str, List[str]] = {}
    used = set()
    names = list(target_parameters or [])
    for path in _expert_chains(root):
        unwrapped = path.replace(".base_layer", "")
        for proj in PROJECTIONS:
            key = f"{unwrapped}.{proj}"
            for t in names:
                if key == t or key.endswith("." + t):
                    targets.setdefault(path, [])
                    if proj not in targets[path]:
                        targets[path].append(proj)
                    used.add(t)
    return targets, [t for t in names if t not in used]


def _inject(peft_model, config, adapter_name: str, targets: Dict[str, List[str]]) -> None:
    from peft.utils.other import get_pattern_key

    root = peft_model.base_model.model
    for path, projs in targets.items():
        parent, attr = _parent(root, path)
        module = getattr(parent, attr)
        key_base = path.replace(".base_layer", "")

        def rank_alpha(proj):
            key = f"{key_base}.{proj}"
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
            a = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
            return r, a

        if isinstance(module, MxGptOssExperts):
            layer = module
            for proj in sorted(projs, key=PROJECTIONS.index):  # gate_up inner, down outer (as PEFT)
                r, a = rank_alpha(proj)
                layer = MxLoraExperts(layer, adapter_name, proj, config, r=r, lora_alpha=a)
            setattr(parent, attr, layer)
            chain = layer.chain()
        else:
            chain = module.chain()
            have = sorted(l.parameter_name for l in chain)
            if have != sorted(projs):
                raise ValueError(
                    f"{path}: all adapters must target the same expert parameters (PEFT's rule); "
                    f"existing {have}, new {sorted(projs)}"
                )
            for layer in chain:
                r, a = rank_alpha(layer.parameter_name)
                layer.update_layer(adapter_name, r, lora_alpha=a, config=config)
        for layer in chain:
            layer.set_adapter(peft_model.active_adapters, inference_mode=config.inference_mode)


def _prepare(model_root: nn.Module, peft_config):
    """(config for PEFT without the expert targets, expert targets, whether a dummy target was used)."""
    targets, remaining = _match_targets(model_root, getattr(peft_config, "target_parameters", None))
    if not targets:
        return peft_config, targets, False
    _check_lora_config(peft_config)
    cfg = copy.deepcopy(peft_config)
    cfg.target_parameters = remaining or None
    dummy = False
    if not cfg.target_modules and not cfg.target_parameters:
        from peft.utils.constants import DUMMY_TARGET_MODULES

        cfg.target_modules = DUMMY_TARGET_MODULES
        dummy = True
    return cfg, targets, dummy


def _finish(peft_model, peft_config, adapter_name, targets, dummy, autocast_adapter_dtype) -> None:
    from peft.tuners.tuners_utils import cast_adapter_dtype

    stored = peft_model.peft_config[adapter_name]
    _inject(peft_model, stored, adapter_name, targets)
    cast_adapter_dtype(peft_model.base_model.model, adapter_name, autocast_adapter_dtype)
    # The saved adapter_config.json is the stock one: expert LoRA as target_parameters.
    stored.target_parameters = list(peft_config.target_parameters)
    if dummy:
        stored.target_modules = peft_config.target_modules


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model`` for models with ``MxGptOssExperts``: takes the stock config (expert
    LoRA as ``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``, optionally
    with a layer prefix such as ``"7.mlp.experts.gate_up_proj"``; attention LoRA as
    ``target_modules``). The expert LoRA becomes ``MxLoraExperts`` layers (trainable, saved by
    ``save_pretrained`` under PEFT's keys and shapes, with the stock config); everything else is
    PEFT's. Keyword arguments go to ``peft.get_peft_model``."""
    peft = _require_peft()
    cfg, targets, dummy = _prepare(model, peft_config)
    peft_model = peft.get_peft_model(model, cfg, adapter_name=adapter_name, **kwargs)
    if targets:
        _finish(peft_model, peft_config, adapter_name, targets, dummy, kwargs.get("autocast_adapter_dtype", True))
    return peft_model


def add_adapter(peft_model, adapter_name: str, peft_config, **kwargs):
    """``PeftModel.add_adapter`` for models with ``MxGptOssExperts`` (same rules as
    ``get_peft_model``; all adapters must target the same expert parameters)."""
    _require_peft()
    cfg, targets, dummy = _prepare(peft_model.base_model.model, peft_config)
    peft_model.add_adapter(adapter_name, cfg, **kwargs)
    if targets:
        _finish(peft_model, peft_config, adapter_name, targets, dummy, kwargs.get("autocast_adapter_dtype", True))
    return peft_model


def _raw_adapter_config(model_id: str, subfolder: Optional[str], revision: Optional[str]) -> dict:
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model_id, "adapter_config.json", subfolder=subfolder, revision=revision)
    with open(path) as f:
        return json.load(f)


def _orient_state_dict(peft_model, state_dict, peft_version, orientation, trained_with_transformers):
    """Converts the expert LoRA tensors of a loaded adapter state dict (PEFT's saved keys, no
    adapter name) to the standard orientation in place. Returns the orientation used."""
    layers = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, MxLoraExperts):
            layers[name] = m
    entries = []  # (layer, key_a, key_b, standard?)
    for name, layer in layers.items():
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_a not in state_dict or key_b not in state_dict:
            continue
        a, b = state_dict[key_a], state_dict[key_b]
        e, fin, fout = layer.num_experts, layer.in_features, layer.out_features
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] % e or b.shape[1] != a.shape[0]:
            raise ValueError(f"{key_a}/{key_b}: shapes {list(a.shape)}/{list(b.shape)} are not an expert LoRA over {e} experts")
        standard = a.shape[1] == fin and b.shape[0] == fout
        swapped = a.shape[1] == fout and b.shape[0] == fin
        if not (standard or swapped):
            raise ValueError(
                f"{key_a}: shapes {list(a.shape)}/{list(b.shape)} fit neither orientation of "
                f"{layer.parameter_name} (in {fin}, out {fout})"
            )
        entries.append((layer, key_a, key_b, standard, swapped))
    if orientation not in ("auto", "standard", "swapped"):
        raise ValueError(f"orientation must be 'auto', 'standard' or 'swapped', got {orientation!r}")
    if orientation == "auto":
        decided = {("standard" if s else "swapped") for _, _, _, s, w in entries if s != w}
        if len(decided) > 1:
            raise ValueError("the adapter's expert LoRA shapes mix both orientations")
        if decided:
            orientation = decided.pop()
            if peft_version is not None and trained_with_transformers is not None:
                expected = lora_orientation(peft_version, trained_with_transformers)
                if expected != orientation:
                    warnings.warn(
                        f"the expert LoRA shapes say {orientation!r}, but PEFT {peft_version} with "
                        f"transformers {trained_with_transformers} would write {expected!r}; using the shapes",
                        stacklevel=3,
                    )
        elif entries:
            # Only ambiguous (square: H = I down_proj) layers: decide from the versions.
            tv = 5 if trained_with_transformers is None else trained_with_transformers
            orientation = lora_orientation(peft_version or "0.21.0", tv)
            if trained_with_transformers is None and peft_version is not None and _release(peft_version) >= (0, 19, 0):
                warnings.warn(
                    f"the adapter's expert LoRA is square (H = I), so its orientation cannot be read "
                    f"from its shapes; assuming it was trained with transformers 5.x (PEFT "
                    f"{peft_version} → {orientation!r}). Pass trained_with_transformers=4 for a 4.x adapter",
                    stacklevel=3,
                )
        else:
            orientation = "standard"
    for layer, key_a, key_b, standard, swapped in entries:
        if orientation == "swapped":
            if not swapped:
                raise ValueError(f"{key_a}: shapes do not fit the swapped orientation")
            state_dict[key_a], state_dict[key_b] = swap_lora_orientation(
                state_dict[key_a], state_dict[key_b], layer.num_experts)
        elif not standard:
            raise ValueError(f"{key_a}: shapes do not fit the standard orientation")
    return orientation


def load_adapter(
    model: nn.Module,
    model_id: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    orientation: str = "auto",
    trained_with_transformers: Optional[Union[int, str]] = None,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
):
    """``PeftModel.from_pretrained(model, model_id)`` for models with ``MxGptOssExperts`` (or, for
    a ``PeftModel``, ``load_adapter``): loads a PEFT LoRA adapter (saved by mxmoe, or by stock
    transformers + PEFT with ``target_parameters``) and returns the ``PeftModel``.

    Expert LoRA orientation (GPT_OSS.md §3): ``"auto"`` reads it from the shapes (gate_up's are
    never square); an adapter whose expert LoRA is square only (down_proj alone with H = I) is
    resolved with ``lora_orientation(peft_version from adapter_config.json,
    trained_with_transformers or 5)``. ``"standard"`` / ``"swapped"`` force it."""
    peft = _require_peft()
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    model_id = os.fspath(model_id)
    raw = _raw_adapter_config(model_id, subfolder, revision)
    config = peft.PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision)
    config.inference_mode = not is_trainable
    if isinstance(model, peft.PeftModel):
        peft_model = add_adapter(model, adapter_name, config)
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    device = next((b.device for b in peft_model.buffers() if not b.is_meta), torch.device("cpu"))
    hub_kwargs = {k: v for k, v in (("subfolder", subfolder), ("revision", revision)) if v is not None}
    state_dict = load_peft_weights(model_id, device=str(device), **hub_kwargs)
    state_dict = dict(state_dict)
    _orient_state_dict(peft_model, state_dict, raw.get("peft_version"), orientation, trained_with_transformers)
    result = set_peft_model_state_dict(peft_model, state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{model_id}: adapter tensors that match no layer of the model: {unexpected[:8]}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k]
    if missing:
        raise ValueError(f"{model_id}: the adapter lacks tensors for {len(missing)} LoRA weights: {missing[:8]}")
    if not is_trainable:
        peft_model.eval()
    return peft_model
