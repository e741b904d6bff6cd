"""Side by side, in one run (issue #15): one MoE expert projection, forward + backward with LoRA,
timed on the same card for every way of running it that a user of mxmoe would compare:

  mxmoe-bf16                mxmoe on the bf16 weights
  mxmoe-mxfp4-fused         mxmoe on MXFP4 weights, Strategy B (dequantized inside the K-loop)
  mxmoe-mxfp4-selective     mxmoe on MXFP4 weights, Strategy A (active experts dequantized first)
  mxmoe-mxfp4-auto          mxmoe on MXFP4 weights, strategy="auto"
  mxmoe-mxfp4-fused-split-lora
                            the LoRA term split off (issue #15's "fused vs split LoRA"): mxmoe's
                            Strategy B without LoRA, plus the LoRA term computed by torch as in
                            torch-bf16-grouped_mm below (two grouped GEMMs), added
  torch-bf16-grouped_mm     plain torch on the bf16 weights: sort the slots by expert, gather the
                            rows, torch._grouped_mm for the base term and for the LoRA term
                            (x·Aᵀ, then ·Bᵀ, scaled), autograd backward (dX, dA, dB; W frozen)
  torch-dequant-grouped_mm  every step dequantizes ALL experts to bf16 (torchao's MXTensor when it
                            imports, else an exact MXFP4 decode in torch written here; the row's
                            label says which), then the same torch grouped GEMM as above

Same routing ids, x, dY and LoRA factors everywhere. The MXFP4 rows quantize the bf16 weights with
mxmoe's quantizer (``mxmoe.quantize``, bit-exact torchao FLOOR); torch-bf16-grouped_mm uses the
bf16 weights themselves; torch-dequant-grouped_mm uses the dequantization of the same MXFP4 bytes
(torchao's own quantization of the bf16 weights is compared with mxmoe's bytes and, should they
differ, replaced by them).

Shapes (``--shapes``): SPEC §8's problem (K = 2048, N = 1024, top_k = 8, s = 0.5): ``dense`` (E = 128,
T = 4096), ``sparse`` (E = 256, T = 4096), ``balanced-256`` / ``-1024`` / ``-4096`` / ``-16384``
(E = 256); and one gpt-oss expert layer's two projections (H = I = 2880, top_k = 4, T = 4096,
s = 2): ``gpt-oss-20b-gate_up`` / ``gpt-oss-120b-gate_up`` (E = 32 / 128, x = the T tokens, K = 2880,
N = 5760, output per slot) and ``gpt-oss-20b-down`` / ``gpt-oss-120b-down`` (x = T·k per-slot rows,
K = 2880, N = 2880, output gated into T tokens; the gates get no gradient). Groups: ``spec``,
``balanced``, ``gpt-oss``, ``all`` (default).

Each (shape, variant) runs in a fresh subprocess, as in gpt_oss_layer.py. The child builds the
data on the device (seeded; identical in every child), runs the correctness guard, then
``--warmup`` untimed steps and ``--iters`` timed ones. A step is: clear the gradients, forward,
backward with a fixed random dY; each step is bracketed by its own pair of CUDA events and
synchronised (so host time inside the step counts, as in gpt_oss_layer.py); reported is the
median. Everything a variant does per call is inside the step: the routing (sort / offsets, or
mxmoe's routing from the ids), Strategy A's dequantization, the torch-dequant row's
dequantization of all experts. Peak memory: the device's used memory (total minus free, polled
every millisecond from a thread while the steps run) minus what was in use before the child
allocated anything, so resident inputs (weights, x, dY, LoRA, ids) and every transient of the
steps count; mxmoe's buffers come from the CUDA driver, not torch's allocator, hence no torch
counters. The guard and the build run before the polling starts (their transients are not
counted).

Correctness guard (every row, before timing; a row that fails it is not timed, and the run
exits 1): against an fp32 per-expert torch reference with the weights the variant computes
with (the bf16 weights, or the exact dequantization of the MXFP4 bytes; the MXFP4 quantization
error against the bf16 weights is printed as information, not checked), the relative error
max|got − want| / max|want| of (1) y and dX of the full-size call on its first ``--slice``
tokens, and (2) y, dX, dA and dB of a call on those tokens alone with LoRA factors large enough
that the LoRA term is as large as the base term, must each be at most 5e-2.

    PYTHONPATH=<site with the mxmoe wheel> python3 python/bench/side_by_side.py --shapes spec --json sbs-spec.json
    PYTHONPATH=<site> python3 python/bench/side_by_side.py --shapes gpt-oss --json sbs-gpt-oss.json
    python3 python/bench/side_by_side.py --cpu-check     # the torch paths on a tiny shape, no GPU

The Markdown table goes to stdout, a progress line per row to stderr; ``--json`` is rewritten
after every row (``"complete": false`` until the last), so a run cut short keeps its rows.

``--cpu-check`` needs only torch: it checks the torch baseline (per-expert loop, and
torch._grouped_mm where the installed torch has it on the CPU), the exact MXFP4 decode, the
torch-dequant row and the guard's own reference against a dense reference on a tiny problem,
and checks that the guard catches deliberately wrong variants. ``--device cpu`` runs the whole
harness (subprocesses, table, JSON) on the CPU with wall-clock times and no memory numbers; it is
for testing this script on the tiny shapes (``--shapes tiny,tiny-down``), not for measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

try:
    import torch
except ImportError:  # the parent needs no torch; children and --cpu-check do
    torch = None

GUARD_TOL = 5e-2
BASELINE = "torch-bf16-grouped_mm"
RESULT_MARK = "SIDE_BY_SIDE_RESULT "
GUARD_EXIT = 3
# Elements per chunk wherever a whole [E, N, K] weight would need f32/int temporaries.
CHUNK_ELEMS = 1 << 27

VARIANTS = {
    "mxmoe-bf16": "mxmoe bf16",
    "mxmoe-mxfp4-fused": "mxmoe MXFP4 fused (B)",
    "mxmoe-mxfp4-selective": "mxmoe MXFP4 selective (A)",
    "mxmoe-mxfp4-auto": "mxmoe MXFP4 auto",
    "mxmoe-mxfp4-fused-split-lora": "mxmoe MXFP4 fused (B) without LoRA + torch LoRA",
    "torch-bf16-grouped_mm": "torch bf16 grouped_mm",
    "torch-dequant-grouped_mm": "torch dequant + grouped_mm",
}
MX_STRATEGY = {
    "mxmoe-bf16": "auto",
    "mxmoe-mxfp4-fused": "fused",
    "mxmoe-mxfp4-selective": "selective",
    "mxmoe-mxfp4-auto": "auto",
    "mxmoe-mxfp4-fused-split-lora": "fused",
}


def _shape(e, t, k_dim, n, top_k, route, s, per_slot=False, unused=0):
    return dict(E=e, T=t, K=k_dim, N=n, k=top_k, route=route, s=s, per_slot=per_slot, unused=unused)


SHAPES = {
    # SPEC §8 (REF bench_mxfp4.py): K = 2048, N = 1024, top_k = 8, s = 0.5, x tokens, out per slot.
    "dense": _shape(128, 4096, 2048, 1024, 8, "dense", 0.5),
    "sparse": _shape(256, 4096, 2048, 1024, 8, "sparse", 0.5),
    "balanced-256": _shape(256, 256, 2048, 1024, 8, "balanced", 0.5),
    "balanced-1024": _shape(256, 1024, 2048, 1024, 8, "balanced", 0.5),
    "balanced-4096": _shape(256, 4096, 2048, 1024, 8, "balanced", 0.5),
    "balanced-16384": _shape(256, 16384, 2048, 1024, 8, "balanced", 0.5),
    # gpt-oss (H = I = 2880, top-4, T = 4096, lora_alpha = 2r): gate_up takes the tokens and writes
    # one row per slot; down takes the per-slot rows and writes the gated sum per token.
    "gpt-oss-20b-gate_up": _shape(32, 4096, 2880, 5760, 4, "uniform", 2.0),
    "gpt-oss-20b-down": _shape(32, 4096, 2880, 2880, 4, "uniform", 2.0, per_slot=True),
    "gpt-oss-120b-gate_up": _shape(128, 4096, 2880, 5760, 4, "uniform", 2.0),
    "gpt-oss-120b-down": _shape(128, 4096, 2880, 2880, 4, "uniform", 2.0, per_slot=True),
}
# For testing this script (CPU): two experts receive no slot, so empty groups occur.
TEST_SHAPES = {
    "tiny": _shape(8, 24, 64, 48, 2, "uniform", 0.5, unused=2),
    "tiny-down": _shape(8, 24, 64, 48, 2, "uniform", 2.0, per_slot=True, unused=2),
}
ALL_SHAPES = {**SHAPES, **TEST_SHAPES}
GROUPS = {
    "spec": ["dense", "sparse", "balanced-256", "balanced-1024", "balanced-4096", "balanced-16384"],
    "balanced": ["balanced-256", "balanced-1024", "balanced-4096", "balanced-16384"],
    "gpt-oss": ["gpt-oss-20b-gate_up", "gpt-oss-20b-down", "gpt-oss-120b-gate_up", "gpt-oss-120b-down"],
}
GROUPS["all"] = GROUPS["spec"] + GROUPS["gpt-oss"]


def describe_shape(name):
    sh = ALL_SHAPES[name]
    x = "x per slot, out gated per token" if sh["per_slot"] else "x tokens, out per slot"
    return (f"E={sh['E']} T={sh['T']} K={sh['K']} N={sh['N']} top_k={sh['k']} s={sh['s']} "
            f"routing {sh['route']}; {x}")


# ---------------------------------------------------------------------------------------------
# The problem: same values in every child (seeded generators on the device; SPEC §8's seeds).


class Problem:
    """Inputs of one projection. ``x`` [T, K] (or [T·k, K] per slot), ``ids`` [T, k] int64,
    ``gates`` [T, k] bf16 (per-slot shapes only, else None), LoRA ``A`` [E·r, K], ``B`` [N, E·r]
    (expert-major, SPEC §3.1), ``s``, ``dy`` [T·k, N] (or [T, N] gated), ``W`` [E, N, K] bf16,
    and the guard's large LoRA factors ``Av``, ``Bv``."""

    def __init__(self, name, rank, device):
        sh = ALL_SHAPES[name]
        self.name, self.device, self.r = name, device, rank
        self.E, self.T, self.K, self.N, self.k = sh["E"], sh["T"], sh["K"], sh["N"], sh["k"]
        self.s, self.per_slot = sh["s"], sh["per_slot"]
        e, t, k_dim, n, top_k, r = self.E, self.T, self.K, self.N, self.k, rank
        bf16 = torch.bfloat16

        def gen(seed):
            return torch.Generator(device=device).manual_seed(seed)

        def randn(shape, g):
            return torch.randn(shape, generator=g, device=device)

        g = gen(0)  # W_store = randn(E, N, K)/√K in bf16, drawn a few experts at a time
        self.W = torch.empty((e, n, k_dim), dtype=bf16, device=device)
        per = max(1, CHUNK_ELEMS // (n * k_dim))
        for e0 in range(0, e, per):
            e1 = min(e, e0 + per)
            self.W[e0:e1] = (randn((e1 - e0, n, k_dim), g) / math.sqrt(k_dim)).to(bf16)
        g = gen(1)  # router logits, SPEC §8
        if sh["route"] == "sparse":
            logits = 5.0 * randn((e,), g) + 0.1 * randn((t, e), g)
        elif sh["route"] == "balanced":
            logits = randn((t, e), g) + 0.5 * randn((e,), g)
        else:  # "dense" (SPEC) and "uniform" (gpt-oss): randn(T, E)
            logits = randn((t, e), g)
        if sh["unused"]:
            logits[:, e - sh["unused"]:] = -float("inf")
        vals, ids = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        self.ids = ids.contiguous()
        self.gates = (vals / vals.sum(dim=-1, keepdim=True)).to(bf16) if self.per_slot else None
        g = gen(2)
        self.A = (0.01 * randn((e * r, k_dim), g)).to(bf16)
        self.B = (0.01 * randn((n, e * r), g)).to(bf16)
        g = gen(3)
        self.x = randn((self.x_rows(t), k_dim), g).to(bf16)
        g = gen(4)
        self.dy = randn((self.y_rows(t), n), g).to(bf16)
        g = gen(5)  # the guard's LoRA: x·Aᵀ ~ N(0, 1) per rank lane, the LoRA term ~ s·N(0, 1)
        self.Av = (randn((e * r, k_dim), g) / math.sqrt(k_dim)).to(bf16)
        self.Bv = (randn((n, e * r), g) / math.sqrt(r)).to(bf16)

    def x_rows(self, tokens):
        return tokens * self.k if self.per_slot else tokens

    def y_rows(self, tokens):
        return tokens if self.per_slot else tokens * self.k

    def active(self):
        return int((torch.bincount(self.ids.reshape(-1), minlength=self.E) > 0).sum().item())

    def w_check(self):
        """A cheap fingerprint of W (a strided sample), to validate a cached quantization."""
        flat = self.W.reshape(-1)
        return float(flat[:: max(1, flat.numel() // 1_000_003)].float().sum().item())


# ---------------------------------------------------------------------------------------------
# MXFP4 → bf16, exact (SPEC §1.3/§1.5: codes decoded to bf16, times the scale 2^(b − 127) in bf16;
# 255 is NaN), chunked so the temporaries stay small.

_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M1 = _E2M1 + [-v for v in _E2M1]
_PAIR_LUT = {}


def _pair_lut(device):
    """[256, 2] bf16: byte → (value of its low nibble = even k, value of its high nibble)."""
    key = str(device)
    if key not in _PAIR_LUT:
        b = torch.arange(256)
        lut = torch.tensor(_E2M1, dtype=torch.float32)
        _PAIR_LUT[key] = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).to(torch.bfloat16).to(device)
    return _PAIR_LUT[key]


def scale_values(scales):
    """E8M0 bytes → 2^(b − 127) in bf16, by bit construction (b = 0 gives 2^−127, 255 NaN)."""
    b = scales.view(torch.uint8).to(torch.int32)
    f = (b << 23).view(torch.float32)
    f = torch.where(b == 0, torch.full_like(f, 2.0**-127), f)
    f = torch.where(b == 255, torch.full_like(f, float("nan")), f)
    return f.to(torch.bfloat16)


def library_dequantize(packed, scales, e):
    """Expert ``e`` dequantized by mxmoe's own dequantizer (``mxmoe.dequantize``: on the CPU,
    bit-exact with torchao), as ``[N, K]`` bf16 on ``packed``'s device."""
    import mxmoe

    return mxmoe.dequantize(packed[e:e + 1], scales[e:e + 1])[0].to(packed.device)


def exact_decode_note(packed, scales):
    """``[]`` when :func:`dequantize_exact` equals ``mxmoe.dequantize`` bit for bit on expert 0
    (on ``packed``'s device), else one note saying how many values differ and the first of them
    (what a run records instead of failing: the guards use the library's dequantization)."""
    got = dequantize_exact(packed[:1], scales[:1])[0]
    want = library_dequantize(packed, scales, 0)
    bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero()
    if bad.numel() == 0:
        return []
    n, k = (int(v) for v in bad[0])
    return [f"dequantize_exact differs from mxmoe.dequantize on {bad.shape[0]} of {got.numel()} values of "
            f"expert 0 on {packed.device} (first at [{n}, {k}]: {float(got[n, k])!r} vs {float(want[n, k])!r}, "
            f"packed byte {int(packed[0, n, k // 2])}, scale byte {int(scales[0, n, k // 32])})"]


def dequantize_exact(packed, scales):
    """``(packed [E, N, K/2], scales [E, N, K/32])`` → ``[E, N, K]`` bf16 on their device."""
    e, n, half = packed.shape
    k_dim = 2 * half
    out = torch.empty((e, n, k_dim), dtype=torch.bfloat16, device=packed.device)
    lut = _pair_lut(packed.device)
    per = max(1, CHUNK_ELEMS // (n * k_dim))
    for e0 in range(0, e, per):
        e1 = min(e, e0 + per)
        vals = torch.index_select(lut, 0, packed[e0:e1].reshape(-1).to(torch.int32))
        vals = vals.view(e1 - e0, n, k_dim // 32, 32)
        sc = scale_values(scales[e0:e1]).unsqueeze(-1)
        torch.mul(vals, sc, out=out[e0:e1].view(e1 - e0, n, k_dim // 32, 32))
    return out


def torchao_dequantizer(w, packed, scales):
    """torchao's MXTensor over the same bytes, dequantized per call. Returns ``(fn, note)``:
    ``fn()`` gives all experts as ``[E, N, K]`` bf16. Raises (any exception) when torchao is not
    usable here; the caller falls back to ``dequantize_exact`` and says why."""
    from torchao.prototype.mx_formats.mx_tensor import MXTensor  # a namespace "torchao" is not enough

    fp4s = [getattr(torch, "float4_e2m1fn_x2", None)]  # torchao >= 0.11; older: its own constant
    try:
        from torchao.prototype.mx_formats.constants import DTYPE_FP4

        fp4s.append(DTYPE_FP4)
    except ImportError:
        pass
    fp4s = [f for f in dict.fromkeys(fp4s) if f is not None]

    def to_mx(t):
        for i, fp4 in enumerate(fp4s):
            try:
                return MXTensor.to_mx(t, fp4, block_size=32)
            except Exception:  # noqa: BLE001 (try the next spelling, re-raise the last)
                if i == len(fp4s) - 1:
                    raise
        raise RuntimeError("torchao names no FP4 element dtype")
    try:
        from importlib.metadata import version

        ao_version = version("torchao")
    except Exception:
        ao_version = getattr(__import__("torchao"), "__version__", "?")

    def inner(mx, names):
        for name in names:
            t = getattr(mx, name, None)
            if isinstance(t, torch.Tensor):
                return t.view(torch.uint8) if t.dtype != torch.uint8 else t
        raise RuntimeError(f"torchao MXTensor has none of {names}")

    e, n, k_dim = w.shape
    device = w.device  # (the per-call closure must not keep w alive)
    per = max(1, CHUNK_ELEMS // (n * k_dim))
    chunks, differ = [], 0
    for e0 in range(0, e, per):
        e1 = min(e, e0 + per)
        mx = to_mx(w[e0:e1].contiguous())
        q, sc = inner(mx, ("qdata", "_data")), inner(mx, ("scale", "_scale_e8m0"))
        if q.numel() != packed[e0:e1].numel() or sc.numel() != scales[e0:e1].numel():
            raise RuntimeError(f"torchao's MXTensor layout is not [E, N, K/2] + [E, N, K/32] "
                               f"(qdata {list(q.shape)}, scale {list(sc.shape)})")
        d = int((q.reshape(-1) != packed[e0:e1].reshape(-1)).sum().item())
        d += int((sc.reshape(-1) != scales[e0:e1].reshape(-1)).sum().item())
        if d:
            differ += d
            q.copy_(packed[e0:e1].reshape(q.shape))
            sc.copy_(scales[e0:e1].reshape(sc.shape))
        chunks.append((e0, e1, mx))

    def deq(mx):
        if hasattr(mx, "dequantize"):
            return mx.dequantize(torch.bfloat16)
        return mx.to_dtype(torch.bfloat16)

    e0, e1, mx0 = chunks[0]
    got = deq(mx0)
    want = dequantize_exact(packed[e0:e1], scales[e0:e1])
    if got.shape != want.shape or not torch.equal(got.view(torch.int16), want.view(torch.int16)):
        raise RuntimeError("torchao's dequantization differs from the exact MXFP4 decode")
    del got, want

    def fn():
        if len(chunks) == 1:
            return deq(chunks[0][2])
        out = torch.empty((e, n, k_dim), dtype=torch.bfloat16, device=device)
        for c0, c1, mx in chunks:
            out[c0:c1].copy_(deq(mx))
        return out

    note = (f"torchao {ao_version} MXTensor.dequantize, {len(chunks)} chunk(s) of experts; its "
            f"quantization of the bf16 weights "
            + ("equals mxmoe's bytes" if not differ else f"differed in {differ} bytes from mxmoe's (replaced)"))
    return fn, note


# ---------------------------------------------------------------------------------------------
# The torch baseline: sort + gather + grouped GEMM (base and LoRA), autograd backward.


def grouped_mm(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


def loop_mm(a, b, offs):
    """The per-expert loop that stands in for ``torch._grouped_mm`` where it is missing."""
    bounds = [0] + offs.tolist()
    parts = [a[s:e] @ b[g] for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])) if e > s]
    return torch.cat(parts) if parts else a.new_zeros((0, b.shape[-1]))


def pick_mm(device):
    """``(mm, label)``: torch._grouped_mm on a CUDA device where a forward + backward through it
    works, else the per-expert loop (always on the CPU), with the reason in the label."""
    if device.type != "cuda":
        return loop_mm, "per-expert loop (CPU)"
    if not hasattr(torch, "_grouped_mm"):
        return loop_mm, f"per-expert loop (torch {torch.__version__} has no torch._grouped_mm)"
    try:
        a = torch.randn((32, 64), device=device, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn((2, 64, 32), device=device, dtype=torch.bfloat16, requires_grad=True)
        offs = torch.tensor([8, 32], dtype=torch.int32, device=device)
        y = grouped_mm(a, b, offs)
        y.backward(torch.randn_like(y))
        ref = torch.cat([a[:8] @ b[0], a[8:] @ b[1]])
        if (y.float() - ref.float()).abs().max().item() > 0.1 * ref.float().abs().max().item():
            raise RuntimeError("wrong result on a test problem")
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 (any failure means: don't use it)
        return loop_mm, f"per-expert loop (torch._grouped_mm failed: {exc})"
    return grouped_mm, "torch._grouped_mm"


def torch_projection(x, ids, gates, w, a, b, s, mm, per_slot, keep_grouped=False, experts=None):
    """``y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ`` per slot in plain torch. ``w`` [E, N, K] bf16 (frozen),
    ``a`` [E·r, K], ``b`` [N, E·r]. The slots are sorted by expert (stable), their input rows
    gathered (token ``slot // k``, or the slot's own row with ``per_slot``), three grouped GEMMs
    run on the expert-contiguous rows, and the rows go back to slot order (``keep_grouped`` skips
    that: a deliberate bug for the guard's self-test); with ``gates`` the k slots of each token
    are summed with their gate weights (fp32, then bf16). ``w=None`` computes the LoRA term
    alone (``s·(x·A_eᵀ)·B_eᵀ``, same order and gating; ``experts`` then gives E): the split row
    adds it to mxmoe's LoRA-free output."""
    t, k = ids.shape
    e, n, k_dim = w.shape if w is not None else (experts, b.shape[0], a.shape[1])
    r = a.shape[0] // e
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    # offs[g] = end of expert g's rows = number of slots with an id ≤ g (no host sync).
    offs = torch.searchsorted(sorted_ids, torch.arange(e, device=flat.device), right=True).to(torch.int32)
    src = order if per_slot else torch.div(order, k, rounding_mode="floor")
    xg = x.index_select(0, src)
    xa = mm(xg, a.view(e, r, k_dim).transpose(1, 2), offs)  # [L, r]
    # B [N, E·r] → [E, N, r] (a small copy, so B_eᵀ has W's layout: a column-major [r, N] view).
    lora = mm(xa, b.view(n, e, r).permute(1, 0, 2).contiguous().transpose(1, 2), offs)
    if w is None:
        yg = s * lora
    else:
        base = mm(xg, w.transpose(1, 2), offs)  # W_eᵀ [K, N]: a column-major view, no copy
        yg = base + s * lora
    y = yg if keep_grouped else torch.empty_like(yg).index_copy(0, order, yg)
    if gates is not None:
        y = (y.view(t, k, n).float() * gates.float().unsqueeze(-1)).sum(dim=1).to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# References (fp32) and the guard.


def dense_reference(x, ids, gates, w, a, b, s, per_slot, dy):
    """Dense fp32 reference without any sorting: every slot gathers its expert's W, A_e, B_e.
    Returns ``(y, dx, da, db)`` (fp32). Small problems only (a [T·k, N, K] temporary)."""
    t, k = ids.shape
    e, n, k_dim = w.shape
    r = a.shape[0] // e
    xl, al, bl = (v.detach().float().requires_grad_() for v in (x, a, b))
    xs = xl if per_slot else xl.repeat_interleave(k, dim=0)
    flat = ids.reshape(-1)
    ws = w.float()[flat]
    as_ = al.view(e, r, k_dim)[flat]
    bs = bl.view(n, e, r).permute(1, 0, 2)[flat]  # [L, N, r]
    xa = torch.einsum("lk,lrk->lr", xs, as_)
    y = torch.einsum("lk,lnk->ln", xs, ws) + s * torch.einsum("lr,lnr->ln", xa, bs)
    if gates is not None:
        y = (y.view(t, k, n) * gates.float().unsqueeze(-1)).sum(dim=1)
    y.backward(dy.float())
    return y.detach(), xl.grad, al.grad, bl.grad


def loop_reference(x, ids, gates, weight_of, a, b, s, per_slot, dy, e_count):
    """The guard's fp32 reference, one expert at a time (``weight_of(e)`` gives expert e's
    [N, K] weight), so it fits beside a real-size problem. Returns ``(y, dx, da, db)``."""
    t, k = ids.shape
    k_dim = x.shape[1]
    r = a.shape[0] // e_count
    xl, al, bl = (v.detach().float().requires_grad_() for v in (x, a, b))
    xs = xl if per_slot else xl.repeat_interleave(k, dim=0)
    flat = ids.reshape(-1)
    rows_all, parts = [], []
    for ex in torch.unique(flat).tolist():
        rows = (flat == ex).nonzero().reshape(-1)
        xe = xs.index_select(0, rows)
        we = weight_of(ex).float()
        ae = al.view(e_count, r, k_dim)[ex]
        be = bl[:, ex * r:(ex + 1) * r]
        parts.append(xe @ we.T + s * ((xe @ ae.T) @ be.T))
        rows_all.append(rows)
    rows = torch.cat(rows_all)
    yg = torch.cat(parts)
    y = torch.zeros((flat.numel(), yg.shape[1]), dtype=torch.float32, device=x.device).index_copy(0, rows, yg)
    if gates is not None:
        y = (y.view(t, k, -1) * gates.float().unsqueeze(-1)).sum(dim=1)
    y.backward(dy.float())
    return y.detach(), xl.grad, al.grad, bl.grad


def rel_err(got, want):
    """max|got − want| / max|want| (NaN when got has NaN or inf: never passes)."""
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        return float("nan")
    if not bool(torch.isfinite(got).all()):
        return float("nan")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def run_call(fn, x, ids, gates, a, b, dy):
    """One forward + backward of ``fn`` on fresh leaves; ``(y, dx, da, db)``."""
    xl, al, bl = (v.detach().clone().requires_grad_() for v in (x, a, b))
    y = fn(xl, ids, gates, al, bl)
    y.backward(dy)
    return y.detach(), xl.grad, al.grad, bl.grad


def guard(fn, prob, weight_of, slice_tokens, tol=GUARD_TOL, weight_of_bf16=None):
    """The correctness guard (see the module docstring). Returns a dict: ``errors`` (checked),
    ``info`` (not checked), ``worst``, ``ok``."""
    p = prob
    st = min(slice_tokens, p.T)
    sx, sy = p.x_rows(st), p.y_rows(st)
    ids_s = p.ids[:st]
    gates_s = p.gates[:st] if p.gates is not None else None
    x_s, dy_s = p.x[:sx], p.dy[:sy]
    errors, info = {}, {}

    # (1) the full-size call, its first tokens' rows, with the benchmark's LoRA.
    y, dx, _, _ = run_call(fn, p.x, p.ids, p.gates, p.A, p.B, p.dy)
    ry, rdx, _, _ = loop_reference(x_s, ids_s, gates_s, weight_of, p.A, p.B, p.s, p.per_slot, dy_s, p.E)
    errors["y (full call)"] = rel_err(y[:sy], ry)
    errors["dx (full call)"] = rel_err(dx[:sx], rdx)
    del y, dx
    if weight_of_bf16 is not None:
        by, _, _, _ = loop_reference(x_s, ids_s, gates_s, weight_of_bf16, p.A, p.B, p.s, p.per_slot, dy_s, p.E)
        info["y: MXFP4 vs bf16 weights (quantization, not checked)"] = rel_err(ry, by)

    # (2) a call on the slice alone with large LoRA factors: every output and gradient.
    got = run_call(fn, x_s, ids_s, gates_s, p.Av, p.Bv, dy_s)
    want = loop_reference(x_s, ids_s, gates_s, weight_of, p.Av, p.Bv, p.s, p.per_slot, dy_s, p.E)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        errors[f"{name} (slice call, large LoRA)"] = rel_err(g, w)
    vals = list(errors.values())
    worst = float("nan") if any(v != v for v in vals) else max(vals)
    ok = all(v <= tol for v in vals)  # NaN compares False: fails
    return dict(errors=errors, info=info, worst=worst, ok=ok, tol=tol, slice_tokens=st)


# ---------------------------------------------------------------------------------------------
# Variants (in a child).


def mxmoe_bytes(prob, cache_dir):
    """mxmoe's MXFP4 quantization of ``prob.W`` (``mxmoe.quantize``, on the CPU, a few experts
    at a time), on the device; cached in ``cache_dir`` for the other children of the same run."""
    import mxmoe

    path = os.path.join(cache_dir, f"{prob.name}.mxfp4.pt") if cache_dir else None
    check = prob.w_check()
    if path and os.path.exists(path):
        d = torch.load(path)
        if d.get("w_check") == check and tuple(d["packed"].shape) == (prob.E, prob.N, prob.K // 2):
            return d["packed"].to(prob.device), d["scales"].to(prob.device), "cached"
    e, n, k_dim = prob.W.shape
    per = max(1, CHUNK_ELEMS // (n * k_dim))
    packed = torch.empty((e, n, k_dim // 2), dtype=torch.uint8)
    scales = torch.empty((e, n, k_dim // 32), dtype=torch.uint8)
    for e0 in range(0, e, per):
        e1 = min(e, e0 + per)
        p, s = mxmoe.quantize(prob.W[e0:e1])
        packed[e0:e1], scales[e0:e1] = p.cpu(), s.cpu()
    if path:
        tmp = path + ".tmp"
        torch.save(dict(packed=packed, scales=scales, w_check=check), tmp)
        os.replace(tmp, path)
    return packed.to(prob.device), scales.to(prob.device), "quantized"


def build_variant(variant, prob, cache_dir):
    """``(fn, label, weight_of, weight_of_bf16, drop, notes)``. ``fn(x, ids, gates, A, B) -> y``;
    ``weight_of(e)`` is expert e's weight as the variant computes with it (for the guard);
    ``drop()`` frees what the timed steps do not need (the bf16 weights of the MXFP4 rows)."""
    notes = []
    w_bf16 = lambda e: prob.W[e]  # noqa: E731

    def drop_w():
        prob.W = None

    if variant.startswith("mxmoe"):
        if prob.device.type != "cuda":
            raise RuntimeError("mxmoe's kernels need a CUDA device (--device cpu runs only the torch rows)")
        import mxmoe

        if not mxmoe.driver_present():
            raise RuntimeError("the CUDA driver is not present for mxmoe")
        strategy = MX_STRATEGY[variant]
        if variant == "mxmoe-bf16":
            weights = prob.W
            weight_of, of_bf16, drop = w_bf16, None, (lambda: None)
        else:
            packed, scales, how = mxmoe_bytes(prob, cache_dir)
            notes.append(f"MXFP4 bytes: mxmoe.quantize ({how})")
            mxmoe.check_scales(scales)  # once, here; the timed calls skip it (allow_nan_scales)
            weights = (packed, scales)
            # The guard's reference weights: the library's own (torchao-exact, CPU) dequantizer.
            weight_of = lambda e: library_dequantize(packed, scales, e)  # noqa: E731
            of_bf16, drop = w_bf16, drop_w
            notes.extend(exact_decode_note(packed, scales))
        try:
            notes.append(f"mxmoe {mxmoe.__version__}, module {mxmoe.device_module(prob.device)}")
        except Exception:  # noqa: BLE001 (informational)
            pass
        s = prob.s
        if variant.endswith("-split-lora"):
            # The lever "fused vs split LoRA" (#15): mxmoe's base GEMM alone, the LoRA term as
            # torch's own sort + gather + two grouped GEMMs, added (autograd sums the gradients).
            mm, mm_label = pick_mm(prob.device)
            notes.append(f"LoRA term: torch ({mm_label}), added to mxmoe's LoRA-free output")
            e, per_slot = prob.E, prob.per_slot

            def fn(x, ids, gates, a, b):
                base = mxmoe.expert_linear(x, ids, weights, None, None, s, gates, "scattered",
                                           "scattered", strategy, allow_nan_scales=True)
                return base + torch_projection(x, ids, gates, None, a, b, s, mm, per_slot,
                                               experts=e)

            return fn, VARIANTS[variant], weight_of, of_bf16, drop, notes

        def fn(x, ids, gates, a, b):
            return mxmoe.expert_linear(x, ids, weights, a, b, s, gates, "scattered", "scattered",
                                       strategy, allow_nan_scales=True)

        return fn, VARIANTS[variant], weight_of, of_bf16, drop, notes

    mm, mm_label = pick_mm(prob.device)
    gemm = "grouped_mm" if mm is grouped_mm else mm_label
    per_slot, s = prob.per_slot, prob.s
    if variant == "torch-bf16-grouped_mm":
        label = "torch bf16 grouped_mm" if mm is grouped_mm else f"torch bf16 {mm_label}"
        w = prob.W

        def fn(x, ids, gates, a, b):
            return torch_projection(x, ids, gates, w, a, b, s, mm, per_slot)

        return fn, label, w_bf16, None, (lambda: None), notes + [f"GEMM: {mm_label}"]

    # torch-dequant-grouped_mm
    packed, scales, how = mxmoe_bytes(prob, cache_dir)
    notes.append(f"MXFP4 bytes: mxmoe.quantize ({how})")
    try:
        dequant, note = torchao_dequantizer(prob.W, packed, scales)
        label = f"torchao dequant all + {gemm}"
        notes.append(note)
    except Exception as exc:  # noqa: BLE001 (torchao missing or unusable: say why, fall back)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        label = f"exact torch dequant all (no torchao) + {gemm}"
        notes.append(f"torchao not used ({reason}); exact MXFP4 decode in torch (dequantize_exact)")

        def dequant():
            return dequantize_exact(packed, scales)

    notes.append(f"GEMM: {mm_label}")
    notes.extend(exact_decode_note(packed, scales))
    # The guard checks the row against the library's dequantization of the same bytes, so a
    # dequantizer here that decodes differently fails the guard instead of checking itself.
    # (with torchao, only this closure keeps mxmoe's bytes: the child drops it before timing)
    weight_of = lambda e: library_dequantize(packed, scales, e)  # noqa: E731

    def fn(x, ids, gates, a, b):
        return torch_projection(x, ids, gates, dequant(), a, b, s, mm, per_slot)

    return fn, label, weight_of, w_bf16, drop_w, notes


# ---------------------------------------------------------------------------------------------
# The child: one (shape, variant).


class MemoryPoller:
    """The device's used memory (total − free), polled every millisecond; ``peak`` in bytes."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self):
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.001)

    def __enter__(self):
        self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def time_steps(step, iters, warmup, device):
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def child(args):
    variant, name = args.child, args.shapes
    device = torch.device(args.device)
    out = dict(variant=variant, shape=name, rank=args.rank, iters=args.iters, warmup=args.warmup,
               torch=torch.__version__, cuda=torch.version.cuda)
    try:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.init()
            torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
            out["device"] = torch.cuda.get_device_name(device)
        else:
            out["device"] = f"cpu ({platform.processor() or platform.machine()})"
        poll = MemoryPoller(device) if cuda else None
        base_used = poll.used() if cuda else 0
        prob = Problem(name, args.rank, device)
        sh = ALL_SHAPES[name]
        out.update(E=prob.E, T=prob.T, K=prob.K, N=prob.N, top_k=prob.k, s=prob.s,
                   per_slot=prob.per_slot, active=prob.active(), route=sh["route"])
        t0 = time.perf_counter()
        fn, label, weight_of, of_bf16, drop, notes = build_variant(variant, prob, args.cache_dir)
        out.update(label=label, notes=notes, build_s=round(time.perf_counter() - t0, 2))
        if args.fault == "lora-x2":  # tests only: a wrong variant, which the guard must stop
            right = fn

            def fn(x, ids, gates, a, b):
                return right(x, ids, gates, a, 2 * b)

            out["notes"] = notes + ["FAULT INJECTED (--fault lora-x2): the LoRA term doubled"]
        g = guard(fn, prob, weight_of, args.slice, weight_of_bf16=of_bf16)
        out["guard"] = jsonable(g)
        if not g["ok"]:
            out["guard_failed"] = True
            print(RESULT_MARK + json.dumps(out), flush=True)
            return GUARD_EXIT
        drop()
        del weight_of, of_bf16
        x, a, b = (v.detach().clone().requires_grad_() for v in (prob.x, prob.A, prob.B))
        prob.x = prob.A = prob.B = prob.Av = prob.Bv = None
        ids, gates, dy = prob.ids, prob.gates, prob.dy

        def step():
            x.grad = a.grad = b.grad = None
            y = fn(x, ids, gates, a, b)
            y.backward(dy)

        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            out["resident_mib"] = (poll.used() - base_used) / 2**20
            with poll:
                times = time_steps(step, args.iters, args.warmup, device)
            out["peak_mib"] = (poll.peak - base_used) / 2**20
        else:
            times = time_steps(step, args.iters, args.warmup, device)
            out["resident_mib"] = out["peak_mib"] = None
        out.update(median_ms=statistics.median(times), min_ms=min(times), mean_ms=statistics.fmean(times),
                   times_ms=times)
    except Exception as exc:  # noqa: BLE001 (reported as the row's error)
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        out["error"] = msg[:300]
        print(RESULT_MARK + json.dumps(jsonable(out)), flush=True)
        return 2
    print(RESULT_MARK + json.dumps(jsonable(out)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: header, one subprocess per (shape, variant), table, JSON.


def _run_quiet(cmd, cwd=None):
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
        return done.stdout.strip() if done.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def header_info():
    here = os.path.dirname(os.path.abspath(__file__))
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                python=platform.python_version(), host=platform.node())
    drv = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if not drv and os.path.exists("/proc/driver/nvidia/version"):
        with open("/proc/driver/nvidia/version") as f:
            drv = f.readline().strip()
    info["driver"] = drv.splitlines()[0] if drv else "unknown"
    commit = os.environ.get("MXMOE_COMMIT")
    source = "MXMOE_COMMIT"
    if not commit:
        commit = _run_quiet(["git", "rev-parse", "--short", "HEAD"], cwd=here)
        source = "git rev-parse (the checkout the script ran from)"
        if commit and _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here):
            commit += "+dirty"
    try:
        import mxmoe

        info["mxmoe_version"] = mxmoe.__version__
        info["mxmoe_path"] = os.path.dirname(mxmoe.__file__)
    except Exception as exc:  # noqa: BLE001
        info["mxmoe_version"] = f"not importable ({type(exc).__name__})"
    if not commit:
        commit, source = f"package {info['mxmoe_version']}", "no git checkout: the package's version"
    info["mxmoe_commit"], info["mxmoe_commit_source"] = commit, source
    return info


_NOTED = []


def write_json(path, obj):
    data = json.dumps(jsonable(obj), indent=1).encode()
    try:
        from mxmoe import _write_atomic  # the package's temp-file-and-rename writer
    except (ImportError, AttributeError):  # an mxmoe without it (or none: --device cpu tests)
        if not _NOTED:
            _NOTED.append(1)
            print("note: mxmoe._write_atomic not available; writing the JSON with a local "
                  "temp-file-and-rename", file=sys.stderr)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    _write_atomic(path, data)


def fmt_err(v):
    return f"{v:.1e}" if isinstance(v, float) and math.isfinite(v) else str(v)


def print_table(rows, hdr, args):
    out = []
    first = next((r for r in rows if r.get("device")), {})
    out.append(f"# Side by side: one expert projection, forward + backward, LoRA r = {args.rank} "
               f"(dX, dA, dB; frozen weights)")
    out.append("")
    out.append(f"- card: {first.get('device', '?')}; driver {hdr['driver']}; torch {first.get('torch', '?')} "
               f"(CUDA {first.get('cuda', '?')}); python {hdr['python']}")
    out.append(f"- mxmoe: {hdr['mxmoe_commit']} ({hdr['mxmoe_commit_source']}); package "
               f"{hdr['mxmoe_version']} at {hdr.get('mxmoe_path', '?')}")
    clock = ("each step timed with CUDA events and synchronised; peak = device memory in use above "
             "the child's start" if args.device == "cuda" else
             "wall-clock times on the CPU (a test of this script, not a measurement); no memory numbers")
    out.append(f"- {hdr['date']}; median of {args.iters} steps after {args.warmup} warm-ups, {clock}; "
               f"guard = worst relative error against the fp32 reference (limit {GUARD_TOL:g})")
    out.append("")
    out.append("| shape | variant | median ms | vs torch bf16 | peak MiB | guard |")
    out.append("|---|---|---:|---:|---:|---:|")
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape, group in by_shape.items():
        base = next((r for r in group if r["variant"] == BASELINE and "median_ms" in r), None)
        act = next((r.get("active") for r in group if r.get("active") is not None), None)
        sh = ALL_SHAPES[shape]
        cell = f"{shape} (E={sh['E']}, T={sh['T']}, {sh['K']}→{sh['N']}"
        cell += f", active {act}/{sh['E']})" if act is not None else ")"
        for r in group:
            label = r.get("label", VARIANTS.get(r["variant"], r["variant"]))
            if "median_ms" in r:
                ratio = f"{base['median_ms'] / r['median_ms']:.2f}×" if base else "—"
                peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "—"
                g = fmt_err(r["guard"]["worst"]) if r.get("guard") else "—"
                out.append(f"| {cell} | {label} | {r['median_ms']:.3f} | {ratio} | {peak} | {g} |")
            elif r.get("guard_failed"):
                out.append(f"| {cell} | {label} | GUARD FAILED (worst {fmt_err(r['guard']['worst'])}): "
                           f"not timed | | | |")
            else:
                out.append(f"| {cell} | {label} | error: {r.get('error', '?')} | | | |")
            cell = ""
    out.append("")
    out.append("vs torch bf16 = the torch bf16 grouped_mm row's median / this row's (above 1: faster).")
    notes = sorted({f"{r['variant']}: {n}" for r in rows for n in r.get("notes", [])})
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(f"- {n}" for n in notes)
    print("\n".join(out), flush=True)


def dump(args, hdr, shapes, rows, failures, started, complete):
    """Writes ``--json`` (``complete`` false while rows are still to come)."""
    first = next((r for r in rows if r.get("device")), {})
    header = dict(hdr, device=first.get("device"), torch=first.get("torch"), cuda=first.get("cuda"),
                  wall_s=round(time.perf_counter() - started, 1))
    problem = {s: dict(ALL_SHAPES[s], described=describe_shape(s)) for s in shapes}
    notes = ("One expert projection, forward + backward with LoRA (dX, dA, dB; frozen weights); "
             "each (shape, variant) in a fresh subprocess; median of per-step CUDA-event times, each "
             "step synchronised; peak_mib = device used memory (total - free, polled every ms) above "
             "the child's start, while the steps run; guard = relative errors against an fp32 "
             "per-expert reference with the variant's own weights; ratio_vs_torch_bf16 = baseline "
             "median / row median.")
    for r in rows:
        base = next((b for b in rows if b["shape"] == r["shape"] and b["variant"] == BASELINE
                     and "median_ms" in b), None)
        if base and "median_ms" in r:
            r["ratio_vs_torch_bf16"] = base["median_ms"] / r["median_ms"]
    write_json(args.json, dict(header=header, complete=complete,
                               options=dict(iters=args.iters, warmup=args.warmup, rank=args.rank,
                                            slice=args.slice, device=args.device),
                               notes=notes, problem=problem, rows=rows, guard_failures=failures))


def parent(args, shapes, variants):
    hdr = header_info()
    cache = tempfile.mkdtemp(prefix="mxmoe-sbs-")
    rows, failures = [], []
    total = len(shapes) * len(variants)
    started = time.perf_counter()
    print(f"side_by_side: {len(shapes)} shape(s) x {len(variants)} variant(s) = {total} subprocesses "
          f"on {args.device}", file=sys.stderr, flush=True)
    try:
        i = 0
        for shape in shapes:
            for variant in variants:
                i += 1
                cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--shapes", shape,
                       "--rank", str(args.rank), "--iters", str(args.iters), "--warmup", str(args.warmup),
                       "--slice", str(args.slice), "--device", args.device, "--cache-dir", cache]
                if args.fault:
                    cmd += ["--fault", args.fault]
                t0 = time.perf_counter()
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
                    stdout, stderr, rc = done.stdout, done.stderr, done.returncode
                except subprocess.TimeoutExpired as exc:
                    stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                    stderr, rc = f"timed out after {args.child_timeout} s", None
                lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
                if lines:
                    row = json.loads(lines[-1][len(RESULT_MARK):])
                else:
                    tail = (stderr.strip().splitlines() or ["?"])[-1]
                    row = dict(variant=variant, shape=shape, error=f"no result (exit {rc}): {tail}"[:300])
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                if "error" in row or row.get("guard_failed"):
                    row["stderr_tail"] = stderr.strip().splitlines()[-15:]
                rows.append(row)
                if row.get("guard_failed"):
                    failures.append(f"{shape} / {variant}")
                    print(f"GUARD FAILED: {shape} / {row.get('label', variant)}: "
                          + ", ".join(f"{k} {fmt_err(v)}" for k, v in row["guard"]["errors"].items()),
                          file=sys.stderr, flush=True)
                if "median_ms" in row:
                    what = f"{row['median_ms']:.3f} ms, guard {fmt_err(row['guard']['worst'])}"
                elif row.get("guard_failed"):
                    what = "GUARD FAILED, not timed"
                else:
                    what = f"error: {row['error']}"
                print(f"[{i}/{total}] {shape} {variant}: {what} ({row['wall_s']} s)", file=sys.stderr, flush=True)
                if args.json:  # after every row, so a run cut short keeps what it measured
                    dump(args, hdr, shapes, rows, failures, started, complete=False)
            for f in os.listdir(cache):  # the shape's quantized bytes are not needed any more
                if f.startswith(shape + "."):
                    os.unlink(os.path.join(cache, f))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print_table(rows, hdr, args)
    if args.json:
        dump(args, hdr, shapes, rows, failures, started, complete=True)
        print(f"wrote {args.json}", file=sys.stderr)
    if failures:
        print(f"\nGUARD FAILED for {len(failures)} row(s): {', '.join(failures)}; those rows were not "
              f"timed and their numbers must not be published.", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# --cpu-check: the torch paths and the guard on tiny problems, no GPU, no mxmoe kernels.


def cpu_check(rank=16, verbose=True):
    """Returns a list of ``(name, value, limit, passed)``; see the module docstring."""
    if torch is None:
        raise RuntimeError("--cpu-check needs torch")
    dev = torch.device("cpu")
    results = []

    def check(name, value, limit, expect_fail=False):
        passed = (not (value <= limit)) if expect_fail else (value <= limit)
        results.append((name, value, limit, passed))
        if verbose:
            rel = ">" if expect_fail else "<="
            print(f"  {'ok  ' if passed else 'FAIL'} {name}: {fmt_err(value)} (want {rel} {limit:g})")

    try:
        import mxmoe
        have_mx = hasattr(mxmoe, "quantize") and hasattr(mxmoe, "dequantize")
    except Exception:  # noqa: BLE001
        mxmoe, have_mx = None, False

    # 1. The exact MXFP4 decode against an independent scalar decode (and mxmoe's, bit-exact).
    gen = torch.Generator().manual_seed(7)
    packed = torch.randint(0, 256, (3, 8, 32), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 150, (3, 8, 2), dtype=torch.uint8, generator=gen)
    scales[0, 0, 0], scales[0, 0, 1], scales[0, 1, 0], scales[0, 1, 1] = 0, 1, 253, 254
    got = dequantize_exact(packed, scales)
    want = torch.empty(got.shape, dtype=torch.float64)
    for e in range(3):
        for n in range(8):
            for kk in range(64):
                byte = int(packed[e, n, kk // 2])
                code = byte & 0xF if kk % 2 == 0 else byte >> 4
                want[e, n, kk] = _E2M1[code] * 2.0 ** (int(scales[e, n, kk // 32]) - 127)
    want = want.to(torch.bfloat16)
    same = torch.equal(got.view(torch.int16), want.view(torch.int16))
    check("exact MXFP4 decode vs scalar decode (bits differing)", 0.0 if same else 1.0, 0.0)
    if have_mx:
        ref = mxmoe.dequantize(packed, scales)
        same = torch.equal(got.view(torch.int16), ref.view(torch.int16))
        check("exact MXFP4 decode vs mxmoe.dequantize (bits differing)", 0.0 if same else 1.0, 0.0)
    elif verbose:
        print("  skip exact decode vs mxmoe.dequantize: mxmoe not importable")

    mm_paths = [("loop", loop_mm)]
    if hasattr(torch, "_grouped_mm"):
        try:
            a = torch.randn((16, 32), dtype=torch.bfloat16, requires_grad=True)
            b = torch.randn((2, 32, 16), dtype=torch.bfloat16, requires_grad=True)
            y = grouped_mm(a, b, torch.tensor([5, 16], dtype=torch.int32))
            y.backward(torch.randn_like(y))
            mm_paths.append(("grouped_mm", grouped_mm))
        except Exception as exc:  # noqa: BLE001
            if verbose:
                print(f"  skip torch._grouped_mm on the CPU: {type(exc).__name__}: {exc}")
    elif verbose:
        print(f"  skip torch._grouped_mm: torch {torch.__version__} has none")

    for name in TEST_SHAPES:
        p = Problem(name, rank, dev)
        if verbose:
            print(f"{name}: {describe_shape(name)}, r={rank}, active {p.active()}/{p.E}")
        w_of = lambda e, p=p: p.W[e]  # noqa: E731
        # 2. The guard's per-expert reference against the dense one (fp32, both LoRAs).
        for lora, (a, b) in (("benchmark LoRA", (p.A, p.B)), ("large LoRA", (p.Av, p.Bv))):
            d = dense_reference(p.x, p.ids, p.gates, p.W, a, b, p.s, p.per_slot, p.dy)
            lr = loop_reference(p.x, p.ids, p.gates, w_of, a, b, p.s, p.per_slot, p.dy, p.E)
            err = max(rel_err(g, w) for g, w in zip(lr, d))
            check(f"{name}: guard reference vs dense reference ({lora})", err, 1e-5)
        # 3. The torch baseline (each GEMM path), through the guard and against the dense reference.
        for mm_name, mm in mm_paths:
            fn = (lambda x, ids, g, a, b, mm=mm, p=p:
                  torch_projection(x, ids, g, p.W, a, b, p.s, mm, p.per_slot))
            gd = guard(fn, p, w_of, slice_tokens=p.T // 2)
            check(f"{name}: torch bf16 baseline ({mm_name}) guard", gd["worst"], GUARD_TOL)
            got = run_call(fn, p.x, p.ids, p.gates, p.Av, p.Bv, p.dy)
            d = dense_reference(p.x, p.ids, p.gates, p.W, p.Av, p.Bv, p.s, p.per_slot, p.dy)
            err = max(rel_err(g, w) for g, w in zip(got, d))
            check(f"{name}: torch bf16 baseline ({mm_name}) vs dense reference, all outputs", err, 2e-2)
            # 3b. The split row's LoRA term (``w=None``) added to a LoRA-free base, as the
            # mxmoe split row adds it to mxmoe's output (here the base is torch's, LoRA zeroed).
            split = (lambda x, ids, g, a, b, mm=mm, p=p:
                     torch_projection(x, ids, g, p.W, a.detach() * 0, b.detach() * 0, p.s, mm,
                                      p.per_slot)
                     + torch_projection(x, ids, g, None, a, b, p.s, mm, p.per_slot, experts=p.E))
            got = run_call(split, p.x, p.ids, p.gates, p.Av, p.Bv, p.dy)
            err = max(rel_err(g, w) for g, w in zip(got, d))
            check(f"{name}: base + split LoRA term ({mm_name}) vs dense reference, all outputs", err, 2e-2)
        # 4. The torch-dequant row: bytes from mxmoe's quantizer when importable, else random.
        if have_mx:
            pk, sc = mxmoe.quantize(p.W)
        else:
            g2 = torch.Generator().manual_seed(11)
            pk = torch.randint(0, 256, (p.E, p.N, p.K // 2), dtype=torch.uint8, generator=g2)
            sc = torch.randint(118, 124, (p.E, p.N, p.K // 32), dtype=torch.uint8, generator=g2)
        wq = dequantize_exact(pk, sc)
        if have_mx:
            same = torch.equal(wq.view(torch.int16), mxmoe.dequantize(pk, sc).view(torch.int16))
            check(f"{name}: dequantized weights vs mxmoe.dequantize (bits differing)", 0.0 if same else 1.0, 0.0)
        deqs = [("exact torch", lambda pk=pk, sc=sc: dequantize_exact(pk, sc))]
        try:
            ao_fn, note = torchao_dequantizer(p.W, pk, sc)
            deqs.append(("torchao", ao_fn))
            if verbose:
                print(f"  torchao: {note}")
        except Exception as exc:  # noqa: BLE001
            if verbose:
                print(f"  skip the torchao dequantizer: {type(exc).__name__}: {str(exc)[:120]}")
        wq_of = lambda e, wq=wq: wq[e]  # noqa: E731
        for dq_name, dq in deqs:
            fn = (lambda x, ids, g, a, b, dq=dq, p=p:
                  torch_projection(x, ids, g, dq(), a, b, p.s, mm_paths[-1][1], p.per_slot))
            gd = guard(fn, p, wq_of, slice_tokens=p.T // 2, weight_of_bf16=w_of)
            check(f"{name}: {dq_name} dequant + {mm_paths[-1][0]} guard", gd["worst"], GUARD_TOL)
            if verbose:
                for k, v in gd["info"].items():
                    print(f"       info: {k}: {fmt_err(v)}")
        # 5. The guard catches wrong variants (each must FAIL it).
        mm = mm_paths[-1][1]

        class GradScale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.view_as(t)

            @staticmethod
            def backward(ctx, g):
                return 1.25 * g

        bad = {
            "LoRA scaling doubled": lambda x, ids, g, a, b, p=p: torch_projection(
                x, ids, g, p.W, a, b, 2 * p.s, mm, p.per_slot),
            "rows left in expert order": lambda x, ids, g, a, b, p=p: torch_projection(
                x, ids, g, p.W, a, b, p.s, mm, p.per_slot, keep_grouped=True),
            "dA scaled by 1.25": lambda x, ids, g, a, b, p=p: torch_projection(
                x, ids, g, p.W, GradScale.apply(a), b, p.s, mm, p.per_slot),
            "MXFP4 weights against the bf16 reference": lambda x, ids, g, a, b, p=p, wq=wq: torch_projection(
                x, ids, g, wq, a, b, p.s, mm, p.per_slot),
        }
        for what, fn in bad.items():
            gd = guard(fn, p, w_of, slice_tokens=p.T // 2)
            check(f"{name}: guard rejects a wrong variant ({what})", gd["worst"], GUARD_TOL, expect_fail=True)
    return results


# ---------------------------------------------------------------------------------------------


def parse_shapes(spec, ap):
    names = []
    for part in spec.split(","):
        part = part.strip()
        if part in GROUPS:
            names += GROUPS[part]
        elif part in ALL_SHAPES:
            names.append(part)
        elif part:
            ap.error(f"unknown shape {part!r}; expected some of {sorted(GROUPS)} or {sorted(ALL_SHAPES)}")
    return list(dict.fromkeys(names))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="all", help="comma-separated shapes or groups (spec, balanced, "
                    "gpt-oss, all); default all")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the rows")
    ap.add_argument("--iters", type=int, default=50, help="timed steps per row (default 50, as SPEC §8)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank, a multiple of 8 (default 16)")
    ap.add_argument("--slice", type=int, default=128, help="tokens the guard checks (default 128)")
    ap.add_argument("--json", help="also write the results here (mxmoe._write_atomic)")
    ap.add_argument("--cpu-check", action="store_true", help="check the torch paths on the CPU and exit")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: test this script (tiny shapes, torch rows, wall-clock times)")
    ap.add_argument("--child-timeout", type=int, default=900, help="seconds per subprocess (default 900)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--fault", choices=["lora-x2"], help=argparse.SUPPRESS)  # tests: break every row
    args = ap.parse_args(argv)
    if args.rank < 8 or args.rank > 128 or args.rank % 8:
        ap.error("--rank must be a multiple of 8 from 8 to 128 (torch._grouped_mm needs 16-byte strides; "
                 "mxmoe takes ranks up to 128)")
    if args.iters < 1 or args.warmup < 0 or args.slice < 1:
        ap.error("--iters >= 1, --warmup >= 0, --slice >= 1")
    if args.child:
        if torch is None:
            print(RESULT_MARK + json.dumps(dict(variant=args.child, shape=args.shapes,
                                                error="torch is not importable")))
            return 2
        return child(args)
    if args.cpu_check:
        if torch is None:
            print("--cpu-check needs torch", file=sys.stderr)
            return 2
        print(f"cpu-check: torch {torch.__version__}, the torch paths and the guard on tiny shapes")
        results = cpu_check(rank=args.rank)
        bad = [r for r in results if not r[3]]
        if bad:
            print(f"cpu-check FAILED: {len(bad)} of {len(results)} checks: " + "; ".join(r[0] for r in bad))
            return 1
        print(f"cpu-check OK: all {len(results)} checks as expected")
        return 0
    shapes = parse_shapes(args.shapes, ap)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; expected some of {list(VARIANTS)}")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            ap.error(f"--json: cannot write into {folder}")
    return parent(args, shapes, variants)


if __name__ == "__main__":
    sys.exit(main())
