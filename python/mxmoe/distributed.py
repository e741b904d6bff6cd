"""Expert parallelism: an MoE block whose experts are spread over the ranks of a process group.

Rank ``r`` of a group of ``W`` ranks owns the contiguous experts ``[r*E/W, (r+1)*E/W)`` (their
frozen weights, biases and LoRA; ``E % W == 0``). A forward on every rank, with that rank's own
tokens ``x [T, H]``, router ids ``[T, k]`` (global expert ids, ``-1`` = dropped slot) and gates
``[T, k]``:

1. **Dispatch.** The valid (token, slot) pairs are sorted by global expert id (so by owning rank,
   and by expert within a rank); the per-expert counts ``[E]`` are exchanged with one
   ``all_to_all_single`` and read back to the host: the only host synchronisation, needed for the
   split sizes. Each pair's token row is sent to the rank owning its expert
   (``all_to_all_single``).
2. **Local experts.** The receiver rebuilds the local expert id of every received row from the
   counts (no second exchange) and runs its local experts on them as a top-1 block with gate 1
   (mxmoe's fused ``moe_block`` on CUDA; an eager torch block on the CPU; or ``local_compute``).
3. **Return and combine.** Each row's expert output goes back to the rank it came from (the
   reverse ``all_to_all_single``); the origin combines ``y[t] = sum_j gates[t, j] * o[t, j]`` in
   token order (fp32 sum, rounded once to ``x``'s dtype), so ``d_gates`` comes from autograd at the
   origin.

The backward is the mirror image: the gradient of every received row goes back to its expert's
rank, the local block's backward produces ``dx`` rows and the local LoRA gradients, and the
``dx`` rows go back to their tokens' ranks (the all-to-all's backward is the all-to-all with the
splits swapped). LoRA gradients stay on the rank that owns the experts (nothing to reduce for
them); parameters outside the experts (attention, router) still need the usual data-parallel
gradient all-reduce (e.g. DDP over the rest of the model).

Rules for callers: every rank of the group calls the forward, and later the backward, of every
expert-parallel layer in the same order (both contain collectives), also a rank with no tokens
(``T = 0``); ``x`` and the LoRA ``requires_grad`` the same way on every rank. With a world size of
1 (or no initialised process group and ``group=None``) nothing is communicated: the call is the
local block on all experts.

Needs torch; the process group may be NCCL (CUDA tensors) or gloo (CPU tensors, e.g. for tests).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import autograd as _ag
from ._native import MxmoeError

__all__ = [
    "ExpertParallelMoe",
    "ep_moe_block",
    "local_moe_block",
    "eager_moe_block",
    "expert_range",
    "group_info",
]

Lora = Tuple[torch.Tensor, torch.Tensor, float]
LocalCompute = Callable[..., torch.Tensor]
ACTIVATIONS = ("swiglu", "gpt_oss")
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


# ---------------------------------------------------------------------------------------------
# Groups and ownership.


def group_info(group=None) -> Tuple[int, int]:
    """``(world size, this rank)`` of ``group`` (the default group when ``None``); ``(1, 0)``
    when torch.distributed is unavailable or not initialised and ``group`` is ``None``."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def expert_range(num_experts: int, world_size: int, rank: int) -> Tuple[int, int]:
    """The experts ``[start, stop)`` rank ``rank`` of ``world_size`` owns (contiguous blocks of
    ``num_experts / world_size``). Raises ``MxmoeError`` unless ``world_size`` divides
    ``num_experts``."""
    if num_experts <= 0 or world_size <= 0:
        raise MxmoeError(
            f"expert parallelism: num_experts ({num_experts}) and world size ({world_size}) must be positive"
        )
    if num_experts % world_size != 0:
        raise MxmoeError(
            f"expert parallelism: num_experts = {num_experts} is not divisible by the world size "
            f"{world_size} (every rank owns E / world_size experts); use a group whose size divides E"
        )
    if not 0 <= rank < world_size:
        raise MxmoeError(f"expert parallelism: rank {rank} is outside the group of size {world_size}")
    local = num_experts // world_size
    return rank * local, (rank + 1) * local


def _num_experts(w) -> int:
    return w.shape[0] if isinstance(w, torch.Tensor) else w[0].shape[0]


# ---------------------------------------------------------------------------------------------
# The local block (all experts of this rank).


def _eager_swiglu(x, ids, gates, gate_up, down, gu_lora, dn_lora, limit, allow_nan_scales):
    """``moe_block``'s SwiGLU block in eager torch (any device, ``x``'s dtype): ``[g | u] =
    gate_up_e(x)`` (gate half first), optional clamps ``g <= L``, ``|u| <= L``, ``y[t] = sum_j
    gates[t, j] * down_e(silu(g) * u)``. Autograd gives dx, d_gates and the LoRA gradients."""
    dtype = x.dtype
    e_count = _num_experts(gate_up)
    out = torch.zeros_like(x)
    with torch.no_grad():
        hit = torch.unique(ids[(ids >= 0) & (ids < e_count)]).tolist()
    for e in hit:
        token_idx, slot = torch.where(ids == e)
        z = _ag.eager_projection(x[token_idx], _ag.eager_expert_weight(gate_up, e, dtype, allow_nan_scales),
                                 None, gu_lora, e, e_count)
        i = z.shape[1] // 2
        g, u = z[:, :i], z[:, i:]
        if limit is not None:
            g = g.clamp(max=limit)
            u = u.clamp(min=-limit, max=limit)
        h = F.silu(g) * u
        o = _ag.eager_projection(h, _ag.eager_expert_weight(down, e, dtype, allow_nan_scales), None, dn_lora, e,
                                 e_count)
        out.index_add_(0, token_idx, (o * gates[token_idx, slot, None].to(dtype)).to(dtype))
    return out


def eager_moe_block(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    gate_up,
    down,
    gate_up_lora: Optional[Lora] = None,
    down_lora: Optional[Lora] = None,
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
    """``moe_block``'s arguments, computed in eager torch in ``x``'s dtype (the CPU path: per
    expert dequantize and matmuls; expert-major LoRA). ``activation="gpt_oss"`` is
    ``mxmoe.gpt_oss``'s eager fallback (needs transformers); ``"swiglu"`` its SwiGLU twin here.
    ``strategy`` and ``clamp_boundary`` are ignored (torch's clamp rule applies)."""
    del strategy, clamp_boundary
    if activation == "gpt_oss":
        from .gpt_oss import _eager  # imports transformers

        e = _num_experts(gate_up)
        two_i = gate_up.shape[1] if isinstance(gate_up, torch.Tensor) else gate_up[0].shape[1]
        h = x.shape[1]
        gu_bias = gate_up_bias if gate_up_bias is not None else x.new_zeros((e, two_i))
        dn_bias = down_bias if down_bias is not None else x.new_zeros((e, h))
        return _eager(x, ids, gates, gate_up, down, gu_bias.detach(), dn_bias.detach(),
                      GPT_OSS_ALPHA if alpha is None else float(alpha),
                      GPT_OSS_LIMIT if limit is None else float(limit),
                      gate_up_lora, down_lora, allow_nan_scales)
    if gate_up_bias is not None or down_bias is not None:
        raise MxmoeError('expert biases belong to activation="gpt_oss"; the SwiGLU block has none')
    return _eager_swiglu(x, ids, gates, gate_up, down, gate_up_lora, down_lora, limit, allow_nan_scales)


def local_moe_block(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, gate_up, down,
                    gate_up_lora: Optional[Lora] = None, down_lora: Optional[Lora] = None,
                    limit: Optional[float] = None, strategy: str = "auto", **kwargs) -> torch.Tensor:
    """The default local compute: ``mxmoe.moe_block`` for CUDA tensors (bf16), ``eager_moe_block``
    otherwise. Takes ``moe_block``'s arguments."""
    if x.device.type == "cuda":
        return _ag.moe_block(x, ids, gates, gate_up, down, gate_up_lora, down_lora, limit, strategy, **kwargs)
    return eager_moe_block(x, ids, gates, gate_up, down, gate_up_lora, down_lora, limit, strategy, **kwargs)


# ---------------------------------------------------------------------------------------------
# The all-to-all with its backward.


def _all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group, events) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    if events is not None and x.is_cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        end.record()
        events.append((start, end))
    else:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 (rows ``in_splits[r]`` go to rank r, ``out_splits[r]``
    come from it); the backward sends the gradient rows back (the splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, events):
        ctx.splits = (list(out_splits), list(in_splits))
        ctx.group, ctx.events = group, events
        return _all_to_all(x, out_splits, in_splits, group, events)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group, ctx.events), None, None, None, None


# ---------------------------------------------------------------------------------------------
# The expert-parallel block.


def _check_routing(x, ids, gates):
    if x.dim() != 2:
        raise MxmoeError(f"x: expected [T, H], got shape {list(x.shape)}")
    t = x.shape[0]
    if ids.dim() != 2 or ids.shape[0] != t:
        raise MxmoeError(f"ids: expected [{t}, k], got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise MxmoeError(f"ids: expected an integer tensor, got {ids.dtype}")
    if tuple(gates.shape) != tuple(ids.shape):
        raise MxmoeError(f"gates: expected shape {list(ids.shape)} (as ids), got {list(gates.shape)}")


def _keep_in_graph(out: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``out`` (zero rows) made to depend on ``tensors`` with zero gradients, so a rank whose
    local experts received nothing still runs its backward collectives and gets zero (not
    missing) LoRA gradients."""
    anchor = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            term = t.sum() * 0
            anchor = term if anchor is None else anchor + term
    return out if anchor is None else out + anchor.to(out.dtype)


def ep_moe_block(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    gate_up,
    down,
    gate_up_lora: Optional[Lora] = None,
    down_lora: Optional[Lora] = None,
    limit: Optional[float] = None,
    strategy: str = "auto",
    *,
    activation: str = "swiglu",
    alpha: Optional[float] = None,
    clamp_boundary: str = "strict",
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    allow_nan_scales: bool = False,
    group=None,
    local_compute: Optional[LocalCompute] = None,
    comm_events: Optional[list] = None,
) -> torch.Tensor:
    """The expert-parallel gated MoE block, ``y [T, H]`` for this rank's tokens.

    ``x [T, H]``, ``ids [T, k]`` (global expert ids in ``[0, E)``; ``-1`` drops the slot),
    ``gates [T, k]``: this rank's tokens. ``gate_up [E_local, 2I, H]``, ``down [E_local, H, I]``
    (weight forms of ``moe_block``: MXFP4, NVFP4 or dense), the LoRA ``(A [E_local*r, in],
    B [out, E_local*r] expert-major, scaling)`` and the gpt-oss biases ``[E_local, ...]`` are
    this rank's experts ``expert_range(E, W, rank)``, with ``E = E_local * W``. The other arguments are ``moe_block``'s. ``local_compute`` replaces the local block
    (default ``local_moe_block``; called with ``moe_block``'s arguments on the received rows, ids
    ``[R, 1]`` local, gates 1). ``comm_events``: a list that gets a ``(start, end)`` pair of CUDA
    events around every all-to-all (the count exchange, the dispatch and the return, and in the
    backward the two reverse exchanges), for profiling; ignored for CPU tensors.

    One host synchronisation per call (the exchanged counts), plus those of the local
    ``moe_block``: its scale check unless ``allow_nan_scales`` (``ExpertParallelMoe`` checks once
    per buffer version instead) and, with ``strategy`` ``"auto"`` from 256 received rows or
    ``"selective"``, its read-back of the per-expert row counts (``"fused"`` has none). See the
    module docstring for the algorithm and the rules every rank follows."""
    if activation not in ACTIVATIONS:
        raise MxmoeError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    _check_routing(x, ids, gates)
    compute = local_compute if local_compute is not None else local_moe_block
    kwargs = dict(activation=activation, alpha=alpha, clamp_boundary=clamp_boundary,
                  gate_up_bias=gate_up_bias, down_bias=down_bias, allow_nan_scales=allow_nan_scales)
    if activation == "swiglu":
        for name in ("alpha", "gate_up_bias", "down_bias"):
            if kwargs[name] is not None:
                raise MxmoeError(f'{name} belongs to activation="gpt_oss"; the SwiGLU block takes none')
            del kwargs[name]
    world, rank = group_info(group)
    e_local = _num_experts(gate_up)
    if world == 1:
        return compute(x, ids, gates, gate_up, down, gate_up_lora, down_lora, limit, strategy, **kwargs)

    e_total = e_local * world
    t, k = ids.shape
    h = x.shape[1]
    device = x.device

    # 1. Dispatch: sort the valid slots by global expert (= by owning rank, then local expert).
    flat = ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < e_total)
    key = torch.where(valid, flat, torch.full_like(flat, e_total))
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(e_total + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    send_counts = counts[:e_total].contiguous()
    recv_counts = _all_to_all(send_counts, [e_local] * world, [e_local] * world, group, comm_events)
    # recv_counts [W * E_local]: entry s*E_local + j = rows rank s sends to my local expert j.
    per_rank = torch.cat([send_counts.view(world, e_local).sum(1), recv_counts.view(world, e_local).sum(1)])
    sizes = per_rank.tolist()  # the one host synchronisation: split sizes
    send_splits, recv_splits = sizes[:world], sizes[world:]
    n_send, n_recv = sum(send_splits), sum(recv_splits)

    sel = order[:n_send]  # the valid slots, sorted; slot index = token * k + j
    tokens = torch.div(sel, k, rounding_mode="floor")
    x_send = x.index_select(0, tokens)
    x_recv = _AllToAll.apply(x_send, recv_splits, send_splits, group, comm_events)

    # 2. The local experts, top-1 with gate 1; local ids from the counts (rows arrive grouped by
    # source rank, then by local expert).
    local_ids = torch.arange(e_local, dtype=torch.int64, device=device).repeat(world)
    local_ids = torch.repeat_interleave(local_ids, recv_counts, output_size=n_recv).unsqueeze(1)
    ones = torch.ones((n_recv, 1), dtype=torch.bfloat16 if x.is_cuda else x.dtype, device=device)
    if n_recv > 0:
        o_local = compute(x_recv, local_ids, ones, gate_up, down, gate_up_lora, down_lora, limit,
                          strategy, **kwargs)
    else:
        lora_tensors = [t_ for lora in (gate_up_lora, down_lora) if lora is not None for t_ in lora[:2]]
        o_local = _keep_in_graph(x_recv.new_zeros((0, h)) + x_recv.sum() * 0, lora_tensors)
    o_local = o_local.to(x.dtype)

    # 3. Back to the origin, combined in token order.
    o_back = _AllToAll.apply(o_local, send_splits, recv_splits, group, comm_events)
    slots = torch.zeros((t * k, h), dtype=o_back.dtype, device=device).index_copy(0, sel, o_back)
    y = (slots.view(t, k, h).float() * gates.float().unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The module.


def _lora_pair(experts: int, rank: int, k: int, n: int, device, dtype):
    a = torch.empty((experts * rank, k), dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros((n, experts * rank), dtype=dtype, device=device)
    return nn.Parameter(a), nn.Parameter(b)


class ExpertParallelMoe(nn.Module):
    """The gated MoE block (``activation`` ``"swiglu"`` or ``"gpt_oss"``) with its experts spread
    over the ranks of ``group`` (default: the default group; world size 1 without one): this rank
    holds experts ``[expert_start, expert_stop)`` of ``num_experts``.

    Buffers (this rank's experts only): ``weight_format="mxfp4"``: ``gate_up_packed [E_l, 2I,
    H/2]``, ``gate_up_scales [E_l, 2I, H/32]``, ``down_packed [E_l, H, I/2]``, ``down_scales
    [E_l, H, I/32]``; ``"dense"``: ``gate_up_weight [E_l, 2I, H]`` and ``down_weight [E_l, H, I]``
    in ``dtype``. With ``activation="gpt_oss"`` also the frozen ``gate_up_bias [E_l, 2I]`` and
    ``down_bias [E_l, H]`` (gate/up rows interleaved as in the checkpoint). Parameters: the LoRA of
    the local experts, expert-major as in ``MxMoeBlock``: ``gate_up_lora_A [E_l*r, H]``,
    ``gate_up_lora_B [2I, E_l*r]``, ``down_lora_A [E_l*r, I]``, ``down_lora_B [H, E_l*r]`` (B
    zero-initialised), scaling ``lora_alpha / r``.

    ``forward(x [T, H], ids [T, k] global expert ids, gates [T, k])`` is ``ep_moe_block``: every
    rank calls it (and the backward) in step, also with ``T = 0``. On CUDA the local experts run
    mxmoe's fused block (bf16 ``dtype``); on the CPU the eager torch block (any float dtype)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, rank: int = 8,
                 lora_alpha: Optional[float] = None, *, activation: str = "swiglu",
                 limit: Optional[float] = None, alpha: Optional[float] = None,
                 clamp_boundary: Optional[str] = None, strategy: str = "auto",
                 weight_format: str = "mxfp4", group=None, device=None,
                 dtype: torch.dtype = torch.bfloat16, local_compute: Optional[LocalCompute] = None,
                 allow_nan_scales: bool = False):
        super().__init__()
        self.allow_nan_scales = allow_nan_scales
        self._checked_scales = None
        if activation not in ACTIVATIONS:
            raise MxmoeError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if weight_format not in ("mxfp4", "dense"):
            raise MxmoeError(f'weight_format: expected "mxfp4" or "dense", got {weight_format!r}')
        e, h, i = num_experts, hidden, intermediate
        if weight_format == "mxfp4" and (h % 32 or i % 32):
            raise MxmoeError(f"hidden ({h}) and intermediate ({i}) must be multiples of the MX block size 32")
        self.group = group
        self.world_size, self.rank_in_group = group_info(group)
        self.expert_start, self.expert_stop = expert_range(e, self.world_size, self.rank_in_group)
        el = self.expert_stop - self.expert_start
        self.num_experts, self.num_local_experts = e, el
        self.hidden, self.intermediate = h, i
        self.rank, self.activation, self.strategy = rank, activation, strategy
        self.weight_format, self.local_compute = weight_format, local_compute
        self.scaling = (lora_alpha if lora_alpha is not None else rank) / max(rank, 1)
        if activation == "gpt_oss":
            self.alpha = GPT_OSS_ALPHA if alpha is None else float(alpha)
            self.limit = GPT_OSS_LIMIT if limit is None else float(limit)
            self.clamp_boundary = clamp_boundary or _ag.torch_clamp_boundary()
        else:
            if alpha is not None:
                raise MxmoeError('alpha belongs to activation="gpt_oss"')
            self.alpha, self.limit, self.clamp_boundary = None, limit, "strict"
        u8 = torch.uint8
        if weight_format == "mxfp4":
            self.register_buffer("gate_up_packed", torch.zeros((el, 2 * i, h // 2), dtype=u8, device=device))
            self.register_buffer("gate_up_scales", torch.full((el, 2 * i, h // 32), 127, dtype=u8, device=device))
            self.register_buffer("down_packed", torch.zeros((el, h, i // 2), dtype=u8, device=device))
            self.register_buffer("down_scales", torch.full((el, h, i // 32), 127, dtype=u8, device=device))
        else:
            self.register_buffer("gate_up_weight", torch.zeros((el, 2 * i, h), dtype=dtype, device=device))
            self.register_buffer("down_weight", torch.zeros((el, h, i), dtype=dtype, device=device))
        if activation == "gpt_oss":
            self.register_buffer("gate_up_bias", torch.zeros((el, 2 * i), dtype=dtype, device=device))
            self.register_buffer("down_bias", torch.zeros((el, h), dtype=dtype, device=device))
        if rank > 0:
            self.gate_up_lora_A, self.gate_up_lora_B = _lora_pair(el, rank, h, 2 * i, device, dtype)
            self.down_lora_A, self.down_lora_B = _lora_pair(el, rank, i, h, device, dtype)
        else:
            for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
                self.register_parameter(name, None)

    @classmethod
    def from_weights(cls, gate_up: torch.Tensor, down: torch.Tensor, rank: int = 8,
                     lora_alpha: Optional[float] = None, *, gate_up_bias: Optional[torch.Tensor] = None,
                     down_bias: Optional[torch.Tensor] = None, device=None, **kwargs) -> "ExpertParallelMoe":
        """A module holding this rank's slice of the full ``gate_up [E, 2I, H]`` and ``down
        [E, H, I]`` (and, for gpt-oss, the biases ``[E, 2I]`` / ``[E, H]``); MXFP4 is quantized
        from the slice with ``mxmoe.quantize`` (bit-exact torchao). Every rank may pass the full
        tensors (only its slice is kept); ``device`` defaults to ``gate_up``'s."""
        e, two_i, h = gate_up.shape
        device = gate_up.device if device is None else device
        m = cls(e, h, two_i // 2, rank, lora_alpha, device=device, **kwargs)
        m.load_weights(gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias)
        return m

    def local_slice(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's experts of a full per-expert tensor (``[E, ...]`` along ``dim``)."""
        if t.shape[dim] != self.num_experts:
            raise MxmoeError(f"expected {self.num_experts} experts along dim {dim}, got shape {list(t.shape)}")
        return t.narrow(dim, self.expert_start, self.num_local_experts)

    def lora_slice(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """This rank's part of a full expert-major LoRA tensor: ``which="A"`` rows of ``[E*r,
        in]``, ``"B"`` columns of ``[out, E*r]``."""
        r = self.rank
        start, n = self.expert_start * r, self.num_local_experts * r
        if which == "A":
            return t.narrow(0, start, n)
        if which == "B":
            return t.narrow(1, start, n)
        raise MxmoeError(f'which: expected "A" or "B", got {which!r}')

    @torch.no_grad()
    def load_weights(self, gate_up: torch.Tensor, down: torch.Tensor, *,
                     gate_up_bias: Optional[torch.Tensor] = None,
                     down_bias: Optional[torch.Tensor] = None) -> None:
        """Fills the buffers from the full ``gate_up [E, 2I, H]`` / ``down [E, H, I]`` (this rank's
        slice; quantized for MXFP4)."""
        want = ((self.num_experts, 2 * self.intermediate, self.hidden),
                (self.num_experts, self.hidden, self.intermediate))
        if tuple(gate_up.shape) != want[0] or tuple(down.shape) != want[1]:
            raise MxmoeError(
                f"expected gate_up {list(want[0])} and down {list(want[1])}, got "
                f"{list(gate_up.shape)} and {list(down.shape)}"
            )
        gu, dn = self.local_slice(gate_up), self.local_slice(down)
        if self.weight_format == "mxfp4":
            for name, w in (("gate_up", gu), ("down", dn)):
                packed, scales = _ag.quantize(w.contiguous())
                getattr(self, name + "_packed").copy_(packed)
                getattr(self, name + "_scales").copy_(scales)
        else:
            self.gate_up_weight.copy_(gu)
            self.down_weight.copy_(dn)
        if self.activation == "gpt_oss":
            if gate_up_bias is not None:
                self.gate_up_bias.copy_(self.local_slice(gate_up_bias))
            if down_bias is not None:
                self.down_bias.copy_(self.local_slice(down_bias))
        elif gate_up_bias is not None or down_bias is not None:
            raise MxmoeError('biases belong to activation="gpt_oss"')

    @torch.no_grad()
    def load_mxfp4(self, gate_up: Tuple[torch.Tensor, torch.Tensor], down: Tuple[torch.Tensor, torch.Tensor],
                   *, gate_up_bias: Optional[torch.Tensor] = None,
                   down_bias: Optional[torch.Tensor] = None) -> None:
        """Fills the MXFP4 buffers from ``(packed, scales)`` pairs of all ``E`` experts (this
        rank's slice is copied) or of the local experts only (copied as they are); biases
        likewise. No re-quantization."""
        if self.weight_format != "mxfp4":
            raise MxmoeError('load_mxfp4 needs weight_format="mxfp4"')

        def part(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == self.num_experts:
                return self.local_slice(t)
            if t.shape[0] == self.num_local_experts:
                return t
            raise MxmoeError(
                f"expected {self.num_experts} (all) or {self.num_local_experts} (local) experts, "
                f"got shape {list(t.shape)}"
            )

        for name, (packed, scales) in (("gate_up", gate_up), ("down", down)):
            getattr(self, name + "_packed").copy_(part(packed).view(getattr(self, name + "_packed").shape))
            getattr(self, name + "_scales").copy_(part(scales.view(torch.uint8)))
        for name, b in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
            if b is None:
                continue
            if self.activation != "gpt_oss":
                raise MxmoeError('biases belong to activation="gpt_oss"')
            getattr(self, name).copy_(part(b))

    @classmethod
    def from_gpt_oss(cls, experts: nn.Module, rank: int = 8, lora_alpha: Optional[float] = None, *,
                     group=None, device=None, strategy: Optional[str] = None) -> "ExpertParallelMoe":
        """This rank's slice of an ``mxmoe.gpt_oss.MxGptOssExperts`` (all experts, MXFP4, e.g. on
        the CPU or the meta-free CPU copy of a checkpoint layer) as an expert-parallel gpt-oss
        block on ``device``: blocks, scales and biases copied, ``alpha`` / ``limit`` taken over,
        LoRA fresh (B zero). ``forward`` takes the experts' arguments ``(hidden [T, H],
        top_k_index [T, k], top_k_weights [T, k])``, so it can replace the module in a model."""
        m = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, rank, lora_alpha,
                activation="gpt_oss", alpha=experts.alpha, limit=experts.limit,
                strategy=strategy or experts.strategy, group=group, device=device,
                dtype=experts.gate_up_proj_bias.dtype, allow_nan_scales=experts.allow_nan_scales)
        m.load_mxfp4(experts.gate_up_weights, experts.down_weights,
                     gate_up_bias=experts.gate_up_proj_bias, down_bias=experts.down_proj_bias)
        return m

    @torch.no_grad()
    def load_lora(self, gate_up_A: torch.Tensor, gate_up_B: torch.Tensor, down_A: torch.Tensor,
                  down_B: torch.Tensor) -> None:
        """Copies this rank's part of full expert-major LoRA tensors into the parameters."""
        self.gate_up_lora_A.copy_(self.lora_slice(gate_up_A, "A"))
        self.gate_up_lora_B.copy_(self.lora_slice(gate_up_B, "B"))
        self.down_lora_A.copy_(self.lora_slice(down_A, "A"))
        self.down_lora_B.copy_(self.lora_slice(down_B, "B"))

    @property
    def gate_up_weights(self):
        """The local gate_up weights as ``moe_block`` takes them."""
        if self.weight_format == "mxfp4":
            return (self.gate_up_packed, self.gate_up_scales)
        return self.gate_up_weight

    @property
    def down_weights(self):
        """The local down weights as ``moe_block`` takes them."""
        if self.weight_format == "mxfp4":
            return (self.down_packed, self.down_scales)
        return self.down_weight

    def _check_scales_once(self) -> None:
        """``check_scales`` on the local MXFP4 scales, once per buffer version (a reduction and a
        host synchronisation), unless ``allow_nan_scales``; the op then skips its own check."""
        if self.allow_nan_scales or self.weight_format != "mxfp4":
            return
        key = tuple((b.data_ptr(), b._version) for b in (self.gate_up_scales, self.down_scales))
        if key != self._checked_scales:
            _ag.check_scales(self.gate_up_scales, "gate_up scales")
            _ag.check_scales(self.down_scales, "down scales")
            self._checked_scales = key

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                comm_events: Optional[list] = None) -> torch.Tensor:
        """``x [T, H]``, ``ids [T, k]`` (global expert ids, ``-1`` drops a slot), ``gates [T, k]``
        to ``y [T, H]``; ``comm_events`` as in ``ep_moe_block``."""
        self._check_scales_once()
        gu_lora = dn_lora = None
        if self.rank > 0:
            gu_lora = (self.gate_up_lora_A, self.gate_up_lora_B, self.scaling)
            dn_lora = (self.down_lora_A, self.down_lora_B, self.scaling)
        gpt_oss = self.activation == "gpt_oss"
        return ep_moe_block(
            x, ids, gates, self.gate_up_weights, self.down_weights, gu_lora, dn_lora, self.limit,
            self.strategy, activation=self.activation, alpha=self.alpha,
            clamp_boundary=self.clamp_boundary,
            gate_up_bias=self.gate_up_bias if gpt_oss else None,
            down_bias=self.down_bias if gpt_oss else None,
            allow_nan_scales=True, group=self.group, local_compute=self.local_compute,
            comm_events=comm_events,
        )

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} (local {self.expert_start}..{self.expert_stop}), "
                f"hidden={self.hidden}, intermediate={self.intermediate}, rank={self.rank}, "
                f"activation={self.activation!r}, world_size={self.world_size}, "
                f"weight_format={self.weight_format!r}")
