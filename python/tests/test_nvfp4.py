"""NVFP4 expert weights in the torch layer (issue #17).

CPU tests (CI): ``quantize_nvfp4`` / ``dequantize_nvfp4`` on tensors against the library's byte
functions and a plain-torch decoder (grouped tensor scales included), ``load_nvfp4_experts`` on
ModelOpt and compressed-tensors exports (stacking, tensor scales, errors naming the tensor), the CPU eager fallback of
``mxmoe.gpt_oss.experts_forward`` with NVFP4 weights against the same call on the dequantized
weights, the modules' NVFP4 buffers, and typed errors raised before any launch.

GPU tests (skip without CUDA): NVFP4 through the CUDA ops (Strategy A, Strategy B and Auto)
against the same ops on the bf16-dequantized weights and against a float32 torch reference,
forward and every gradient; ``strategy="fused"`` refused with the library's message where K is
not a multiple of 32 (``"auto"`` then takes A); bad metadata refused by the native layer; a short
LoRA training run on an NVFP4 ``MxMoeBlock``.
"""

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import mxmoe  # noqa: E402
from test_torch import ref_linear, rel_err  # noqa: E402  (the float32 reference and error of test_torch.py)
from test_cpu import _safetensors  # noqa: E402  (test_cpu.py's safetensors writer)

HAVE_GPU = torch.cuda.is_available() and mxmoe.driver_present()
cuda = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA device and the CUDA driver")
bf16, f32 = torch.bfloat16, torch.float32

# E2M1 codes 0..15: sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M1 = _E2M1 + [-v for v in _E2M1]


def torch_dequantize_nvfp4(packed, scales, tensor_scales=None):
    """NVFP4 -> f32 in plain torch: ``code * (tensor_scale * e4m3(scale))``, the scale product
    in f32 first (torchao's ``get_hp_scales``), even k in the low nibble, ``[E]`` or ``[E, G]``
    tensor scales."""
    lut = torch.tensor(_E2M1, dtype=f32, device=packed.device)
    p = packed.to(torch.int64)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    vals = lut[codes]
    s = scales.view(torch.uint8).view(torch.float8_e4m3fn).float()
    if tensor_scales is not None:
        e, n, _ = scales.shape
        g = tensor_scales.reshape(e, -1)
        rows = g.repeat_interleave(n // g.shape[1], dim=1)  # [E, N]
        s = rows.unsqueeze(-1) * s
    return vals * s.repeat_interleave(16, dim=-1)


def raw(t):
    return bytes(t.contiguous().view(torch.uint8).reshape(-1).tolist())


# ---------------------------------------------------------------------------------------------
# CPU: quantize / dequantize on tensors.


@pytest.mark.parametrize("two_level", [False, True], ids=["single", "two_level"])
@pytest.mark.parametrize("in_dtype", [f32, bf16], ids=["f32", "bf16"])
def test_quantize_and_dequantize_match_the_byte_functions(two_level, in_dtype):
    e, n, k = 3, 8, 64
    w = (torch.randn((e, n, k), generator=torch.Generator().manual_seed(0)) * 0.7).to(in_dtype)
    q = mxmoe.quantize_nvfp4(w, two_level=two_level)
    assert isinstance(q, mxmoe.Nvfp4Weights)
    packed, scales, ts = q  # unpacks as a plain triple
    assert packed.shape == (e, n, k // 2) and packed.dtype == torch.uint8
    assert scales.shape == (e, n, k // 16) and scales.dtype == torch.uint8
    name = "bf16" if in_dtype == bf16 else "f32"
    bp, bs, bt = mxmoe.quantize_nvfp4_bytes(raw(w), e, n, k, name, two_level=two_level)
    assert raw(packed) == bp and raw(scales) == bs
    if two_level:
        assert ts.shape == (e,) and ts.dtype == f32 and raw(ts) == bt
    else:
        assert ts is None and bt is None
    for dtype, dname in ((bf16, "bf16"), (f32, "f32")):
        got = mxmoe.dequantize_nvfp4(packed, scales, ts, dtype)
        assert got.shape == (e, n, k) and got.dtype == dtype
        want = mxmoe.dequantize_nvfp4_bytes(bp, bs, e, n, k, bt, dname)
        assert raw(got) == want, dname
    # The plain-torch decoder (the GPU tests' reference) agrees bit for bit.
    deq = mxmoe.dequantize_nvfp4(packed, scales, ts, f32)
    assert torch.equal(deq, torch_dequantize_nvfp4(packed, scales, ts))
    # float8_e4m3fn scales are read as their bytes.
    e4m3 = mxmoe.dequantize_nvfp4(packed, scales.view(torch.float8_e4m3fn), ts, f32)
    assert torch.equal(e4m3, deq)
    # Re-quantizing the dequantized values reproduces the codes and scales (single level).
    if not two_level:
        again = mxmoe.quantize_nvfp4(deq)
        assert torch.equal(again.packed, packed) and torch.equal(again.scales, scales)


def test_one_expert_given_as_a_matrix():
    w = torch.randn((4, 32), generator=torch.Generator().manual_seed(1))
    q = mxmoe.quantize_nvfp4(w, two_level=True)
    assert q.packed.shape == (1, 4, 16) and q.tensor_scales.shape == (1,)


def _nv_export(linears, names):
    """``{f"{base}.{suffix}": tensor}`` of per-linear NVFP4 parts, ``names`` = (codes, scale, global)
    suffixes; the global scale is written as given (a scalar f32)."""
    out = {}
    for base, (packed, scales, global_scale) in linears.items():
        out[f"{base}.{names[0]}"] = ("U8", packed.shape, packed.numpy().tobytes())
        out[f"{base}.{names[1]}"] = ("F8_E4M3", scales.shape, scales.numpy().tobytes())
        out[f"{base}.{names[2]}"] = ("F32", (), torch.tensor(global_scale, dtype=torch.float32).numpy().tobytes())
    return _safetensors(out)


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_load_nvfp4_experts_stacks_per_expert_exports(layout):
    e, i_dim, k = 3, 32, 64
    gen = torch.Generator().manual_seed(11)
    prefix = "model.layers.0.mlp.experts"
    q = {p: mxmoe.quantize_nvfp4(torch.randn((e, i_dim, k), generator=gen), two_level=True)
         for p in ("gate_proj", "up_proj")}
    names = ("weight", "weight_scale", "weight_scale_2") if layout == "modelopt" else \
        ("weight_packed", "weight_scale", "weight_global_scale")
    linears = {}
    for x in range(e):
        for p in ("gate_proj", "up_proj"):
            ts = float(q[p].tensor_scales[x])
            linears[f"{prefix}.{x}.{p}"] = (q[p].packed[x], q[p].scales[x],
                                            ts if layout == "modelopt" else 1.0 / ts)
    data = _nv_export(linears, names)
    got = mxmoe.load_nvfp4_experts(data, prefix, e, ["gate_proj", "up_proj"], k)
    assert got.packed.shape == (e, 2 * i_dim, k // 2) and got.scales.shape == (e, 2 * i_dim, k // 16)
    assert got.tensor_scales.shape == (e, 2) and got.tensor_scales.dtype == torch.float32
    # Each expert's gate rows, then its up rows (the split gate_up layout).
    assert torch.equal(got.packed, torch.cat([q["gate_proj"].packed, q["up_proj"].packed], 1))
    assert torch.equal(got.scales, torch.cat([q["gate_proj"].scales, q["up_proj"].scales], 1))
    want_ts = torch.stack([q["gate_proj"].tensor_scales, q["up_proj"].tensor_scales], 1)
    if layout == "modelopt":
        assert torch.equal(got.tensor_scales, want_ts)
    else:  # the reciprocal of the reciprocal: one f32 rounding each way
        assert torch.allclose(got.tensor_scales, want_ts, rtol=2e-7, atol=0)
    deq = mxmoe.dequantize_nvfp4(*got, dtype=torch.float32)
    want = torch.cat([mxmoe.dequantize_nvfp4(*q["gate_proj"], dtype=torch.float32),
                      mxmoe.dequantize_nvfp4(*q["up_proj"], dtype=torch.float32)], 1)
    assert torch.allclose(deq, want, rtol=1e-6, atol=0)
    # A down projection alone: one tensor scale per expert, shape [E].
    down = mxmoe.load_nvfp4_experts(data, prefix, e, ["up_proj"], k)
    assert down.tensor_scales.shape == (e,)
    # From a path too.
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        assert torch.equal(mxmoe.load_nvfp4_experts(path, prefix, e, ["gate_proj", "up_proj"], k).packed,
                           got.packed)


def test_load_nvfp4_experts_errors_name_the_tensor():
    gen = torch.Generator().manual_seed(12)
    q = mxmoe.quantize_nvfp4(torch.randn((2, 16, 32), generator=gen), two_level=True)
    prefix = "experts"
    linears = {f"{prefix}.{x}.down_proj": (q.packed[x], q.scales[x], float(q.tensor_scales[x])) for x in range(2)}
    data = _nv_export(linears, ("weight", "weight_scale", "weight_scale_2"))
    with pytest.raises(mxmoe.MxmoeError, match="experts.2.down_proj"):
        mxmoe.load_nvfp4_experts(data, prefix, 3, ["down_proj"], 32)
    with pytest.raises(mxmoe.MxmoeError):
        mxmoe.load_nvfp4_experts(data, prefix, 2, ["down_proj"], 64)
    with pytest.raises(mxmoe.MxmoeError):
        mxmoe.load_nvfp4_experts(b"not safetensors", prefix, 2, ["down_proj"], 32)


def test_grouped_tensor_scales_dequantize_per_group_of_rows():
    # [E, 2] tensor scales: the gate and up halves of a stacked gate_up, each with its own scale.
    e, n, k = 2, 8, 32
    gen = torch.Generator().manual_seed(2)
    gate = torch.randn((e, n // 2, k), generator=gen)
    up = torch.randn((e, n // 2, k), generator=gen) * 30
    qg = mxmoe.quantize_nvfp4(gate, two_level=True)
    qu = mxmoe.quantize_nvfp4(up, two_level=True)
    packed = torch.cat([qg.packed, qu.packed], dim=1)
    scales = torch.cat([qg.scales, qu.scales], dim=1)
    ts = torch.stack([qg.tensor_scales, qu.tensor_scales], dim=1)  # [E, 2]
    got = mxmoe.dequantize_nvfp4(packed, scales, ts, f32)
    want = torch.cat([mxmoe.dequantize_nvfp4(*qg, dtype=f32), mxmoe.dequantize_nvfp4(*qu, dtype=f32)], dim=1)
    assert torch.equal(got, want)
    assert torch.equal(got, torch_dequantize_nvfp4(packed, scales, ts))


def test_dequantize_and_check_errors_are_typed():
    q = mxmoe.quantize_nvfp4(torch.randn((2, 4, 32), generator=torch.Generator().manual_seed(3)),
                             two_level=True)
    with pytest.raises(mxmoe.MxmoeError, match=r"NVFP4 scales: expected \[2, 4, 2\]"):
        mxmoe.dequantize_nvfp4(q.packed, q.scales[:, :, :1], q.tensor_scales)
    with pytest.raises(mxmoe.MxmoeError, match="NVFP4 scales: expected dtype u8"):
        mxmoe.dequantize_nvfp4(q.packed, q.scales.float(), q.tensor_scales)
    with pytest.raises(mxmoe.MxmoeError, match="NVFP4 packed: expected dtype u8"):
        mxmoe.dequantize_nvfp4(q.packed.to(torch.int32), q.scales, q.tensor_scales)
    with pytest.raises(mxmoe.MxmoeError, match="NVFP4 tensor_scales: expected dtype f32"):
        mxmoe.dequantize_nvfp4(q.packed, q.scales, q.tensor_scales.double())
    with pytest.raises(mxmoe.MxmoeError, match=r"NVFP4 tensor_scales: expected \[2\] or \[2, G\]"):
        mxmoe.dequantize_nvfp4(q.packed, q.scales, torch.ones(3))
    with pytest.raises(mxmoe.MxmoeError, match="multiple of the block size 16"):
        mxmoe.quantize_nvfp4(torch.ones((1, 2, 24)))
    bad = q.scales.clone()
    bad[1, 2, 1] = 0x7F
    with pytest.raises(mxmoe.MxmoeError, match="NaN"):
        mxmoe.dequantize_nvfp4(q.packed, bad, q.tensor_scales)
    with pytest.raises(mxmoe.MxmoeError, match=r"0x7f at expert 1, row 2, block 1 is NaN"):
        mxmoe.check_nvfp4_scales(bad)
    neg = q.scales.clone()
    neg[0, 0, 0] |= 0x80
    with pytest.raises(mxmoe.MxmoeError, match="is negative"):
        mxmoe.check_nvfp4_scales(neg)
    with pytest.raises(mxmoe.MxmoeError, match=r"tensor scale 1 \(expert 1\) is 0.0"):
        mxmoe.check_nvfp4_scales(q.scales, torch.tensor([1.0, 0.0]))
    mxmoe.check_nvfp4_scales(q.scales, q.tensor_scales)  # valid: no error


def test_ops_check_nvfp4_scales_before_any_launch_and_refuse_cpu_tensors():
    q = mxmoe.quantize_nvfp4(torch.randn((2, 8, 64), generator=torch.Generator().manual_seed(4)),
                             two_level=True)
    x = torch.zeros((4, 64), dtype=bf16)
    ids = torch.zeros((4, 1), dtype=torch.int64)
    bad = q.scales.clone()
    bad[1, 5, 3] = 0xFF
    with pytest.raises(mxmoe.MxmoeError, match="expert 1, row 5, block 3 is NaN"):
        mxmoe.expert_linear(x, ids, (q.packed, bad, q.tensor_scales))
    with pytest.raises(mxmoe.MxmoeError, match="tensor scale 0"):
        mxmoe.expert_linear(x, ids, (q.packed, q.scales, -q.tensor_scales))
    # Valid NVFP4 weights reach the device layer, which refuses CPU tensors (as for MXFP4).
    with pytest.raises(mxmoe.MxmoeError, match="CUDA device"):
        mxmoe.expert_linear(x, ids, q)
    with pytest.raises(mxmoe.MxmoeError, match="CUDA device"):
        mxmoe.expert_linear(x, ids, (q.packed, q.scales, None))
    gu = mxmoe.quantize_nvfp4(torch.randn((2, 32, 64)))  # [E, 2I, H], I = 16
    dn = mxmoe.quantize_nvfp4(torch.randn((2, 64, 16)))  # [E, H, I]
    g = torch.ones((4, 1), dtype=bf16)
    with pytest.raises(mxmoe.MxmoeError, match="CUDA device"):
        mxmoe.moe_block(x, ids, g, gu, dn)
    with pytest.raises(mxmoe.MxmoeError, match="down scales: .*is NaN"):
        mxmoe.moe_block(x, ids, g, gu, (dn.packed, torch.full_like(dn.scales, 0x7F), None))
    with pytest.raises(mxmoe.MxmoeError, match="expert weights: expected"):
        mxmoe.expert_linear(x, ids, (q.packed,))


def test_modules_hold_nvfp4_buffers():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn((4, 32, 48), generator=gen)
    layer = mxmoe.MxExpertLinear.from_weight(w, rank=4, weight_format="nvfp4", two_level=True)
    q = mxmoe.quantize_nvfp4(w, two_level=True)
    assert layer.weight_format == "nvfp4"
    assert torch.equal(layer.packed, q.packed) and torch.equal(layer.scales, q.scales)
    assert torch.equal(layer.tensor_scales, q.tensor_scales)
    assert isinstance(layer.weights, mxmoe.Nvfp4Weights)
    assert set(layer.state_dict()) == {"packed", "scales", "tensor_scales", "lora_A", "lora_B"}
    single = mxmoe.MxExpertLinear.from_weight(w, rank=0, weight_format="nvfp4")
    assert single.tensor_scales is None and "tensor_scales" not in single.state_dict()
    assert torch.equal(single.scales, mxmoe.quantize_nvfp4(w).scales)
    # The default buffers are valid weights (zeros), K needs only be a multiple of 16.
    fresh = mxmoe.MxExpertLinear(2, 48, 8, rank=0, weight_format="nvfp4")
    assert not mxmoe.dequantize_nvfp4(*fresh.weights).any()
    fresh._check_scales_once()
    with pytest.raises(mxmoe.MxmoeError, match="NVFP4 block size 16"):
        mxmoe.MxExpertLinear(2, 40, 8, weight_format="nvfp4")
    with pytest.raises(mxmoe.MxmoeError, match="weight_format"):
        mxmoe.MxExpertLinear(2, 64, 8, weight_format="nvfp8")
    # A refused scale is reported on the first forward (before the CPU tensors are refused).
    fresh.tensor_scales[1] = float("inf")
    x = torch.zeros((4, 48), dtype=bf16)
    ids = torch.zeros((4, 1), dtype=torch.int64)
    with pytest.raises(mxmoe.MxmoeError, match=r"tensor scale 1 \(expert 1\) is inf"):
        fresh(x, ids)
    block = mxmoe.MxMoeBlock.from_weights(torch.randn((4, 64, 32), generator=gen),
                                          torch.randn((4, 32, 32), generator=gen),
                                          rank=2, weight_format="nvfp4", two_level=True)
    assert block.gate_up.weight_format == block.down.weight_format == "nvfp4"
    assert block.gate_up.scales.shape == (4, 64, 2) and block.down.scales.shape == (4, 32, 2)
    assert "weight_format='nvfp4'" in repr(block)


# ---------------------------------------------------------------------------------------------
# CPU: the eager fallback (mxmoe.gpt_oss.experts_forward) dequantizes NVFP4 like MXFP4.


def _gpt_oss():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("mxmoe.gpt_oss needs transformers 5.x")
    import mxmoe.gpt_oss as mg

    return mg


@pytest.mark.parametrize("two_level", [False, True], ids=["single", "two_level"])
def test_cpu_fallback_with_nvfp4_matches_the_dequantized_weights(two_level):
    mg = _gpt_oss()
    e, h, i, t, k, r = 4, 32, 48, 10, 2, 3
    gen = torch.Generator().manual_seed(6)
    gu = mxmoe.quantize_nvfp4(torch.randn((e, 2 * i, h), generator=gen) / h**0.5, two_level=two_level)
    dn = mxmoe.quantize_nvfp4(torch.randn((e, h, i), generator=gen) / i**0.5, two_level=two_level)
    w_gu = mxmoe.dequantize_nvfp4(*gu, dtype=f32)
    w_dn = mxmoe.dequantize_nvfp4(*dn, dtype=f32)
    b_gu = torch.randn((e, 2 * i), generator=gen) * 0.1
    b_dn = torch.randn((e, h), generator=gen) * 0.1
    x0 = torch.randn((t, h), generator=gen)
    ids = torch.rand((t, e), generator=gen).topk(k, dim=-1).indices
    ids[0, 1] = -1  # a dropped slot
    g0 = torch.rand((t, k), generator=gen)
    a1 = torch.randn((e * r, h), generator=gen) * 0.1
    b1 = torch.randn((2 * i, e * r), generator=gen) * 0.1
    a2 = torch.randn((e * r, i), generator=gen) * 0.1
    b2 = torch.randn((h, e * r), generator=gen) * 0.1

    def run(gate_up, down):
        leaves = [z.clone().requires_grad_() for z in (x0, g0, a1, b1, a2, b2)]
        x, g, la1, lb1, la2, lb2 = leaves
        y = mg.experts_forward(x, ids, g, gate_up, down, b_gu, b_dn, alpha=1.702, limit=2.0,
                               gate_up_lora=[(la1, lb1, 0.5)], down_lora=[(la2, lb2, 2.0)])
        y.backward(torch.ones_like(y))
        return y, [z.grad for z in leaves]

    y_nv, grads_nv = run(gu, dn)
    y_dense, grads_dense = run(w_gu, w_dn)
    assert y_nv.abs().max() > 0
    # Same math on the same values: bit-identical in float32.
    assert torch.equal(y_nv, y_dense)
    for got, want in zip(grads_nv, grads_dense):
        assert torch.equal(got, want)
    # bf16 activations: the expert weights are rounded once, exactly as the dense bf16 weights.
    y16 = mg.experts_forward(x0.to(bf16), ids, g0, gu, dn, b_gu, b_dn)
    y16_dense = mg.experts_forward(x0.to(bf16), ids, g0, w_gu.to(bf16), w_dn.to(bf16), b_gu, b_dn)
    assert torch.equal(y16, y16_dense)
    with pytest.raises(ValueError, match="scales shape"):
        mg.experts_forward(x0, ids, g0, (gu.packed, gu.scales[:, :, :1], gu.tensor_scales), dn,
                           b_gu, b_dn)


# ---------------------------------------------------------------------------------------------
# GPU.


def _ids(t, e, k, gen, drop_one=False):
    ids = torch.rand((t, e), generator=gen).topk(k, dim=-1).indices
    if drop_one:
        ids[0, -1] = -1
    return ids.cuda()


LINEAR_SHAPES = [
    # E, K, N, T, top_k, r, s
    pytest.param((8, 128, 256, 16, 2, 8, 0.5), id="E8-K128-N256-T16-k2-r8"),
    pytest.param((32, 2048, 1024, 300, 4, 16, 2.0), id="E32-K2048-N1024-T300-k4-r16"),
]


@cuda
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("two_level", [False, True], ids=["single", "two_level"])
@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
@pytest.mark.parametrize("strategy", ["auto", "selective", "fused"])
def test_expert_linear_nvfp4_matches_bf16_dequantized(shape, two_level, gated, strategy):
    e, k_dim, n, t, top_k, r, s = shape
    gen = torch.Generator().manual_seed(7)
    w = torch.randn((e, n, k_dim), generator=gen) * 0.05
    q = mxmoe.Nvfp4Weights(*(z.cuda() if z is not None else None
                             for z in mxmoe.quantize_nvfp4(w, two_level=two_level)))
    w_bf16 = mxmoe.dequantize_nvfp4(*q, dtype=bf16)
    assert w_bf16.is_cuda
    assert torch.equal(w_bf16, torch_dequantize_nvfp4(*q).to(bf16))
    x0 = torch.randn((t, k_dim), generator=gen).to(bf16).cuda()
    a0 = (torch.randn((e * r, k_dim), generator=gen) / k_dim**0.5).to(bf16).cuda()
    b0 = (torch.randn((n, e * r), generator=gen) * 0.1).to(bf16).cuda()
    g0 = torch.rand((t, top_k), generator=gen).to(bf16).cuda()
    ids = _ids(t, e, top_k, gen, drop_one=True)
    dy = None

    def run(weights, strat):
        nonlocal dy
        leaves = [z.clone().requires_grad_() for z in (x0, a0, b0, g0)]
        x, a, b, g = leaves
        y = mxmoe.expert_linear(x, ids, weights, a, b, s, g if gated else None, strategy=strat)
        if dy is None:
            dy = torch.randn(y.shape, generator=gen).to(bf16).cuda()
        y.backward(dy)
        return y, [z.grad for z in (leaves if gated else leaves[:3])]

    y_nv, grads_nv = run(q, strategy)
    y_bf, grads_bf = run(w_bf16, "auto")
    assert y_nv.shape == ((t, n) if gated else (t * top_k, n)) and y_nv.dtype == bf16
    assert rel_err(y_nv, y_bf) < 1e-2
    for got, want in zip(grads_nv, grads_bf):
        assert rel_err(got, want) < 1e-2
    # And against the float32 reference on the same (dequantized) weights.
    refs = [z.float().requires_grad_() for z in (x0, a0, b0, g0)]
    xr, ar, br, gr = refs
    yr = ref_linear(xr, ids, w_bf16.float(), (ar, br, s), gr if gated else None)
    assert rel_err(y_nv, yr) < 2e-2
    yr.backward(dy.float())
    for got, want in zip(grads_nv, refs):
        assert rel_err(got, want.grad) < 3e-2


@cuda
@pytest.mark.parametrize("activation", ["swiglu", "gpt_oss"])
@pytest.mark.parametrize("grouped", [False, True], ids=["per_expert", "gate_up_groups"])
def test_moe_block_nvfp4_matches_bf16_dequantized(activation, grouped):
    e, h, i, t, top_k, r = 8, 256, 128, 300, 4, 8
    gen = torch.Generator().manual_seed(8)
    w_gu = torch.randn((e, 2 * i, h), generator=gen) / h**0.5
    w_dn = torch.randn((e, h, i), generator=gen) / i**0.5
    if grouped:
        # Split gate/up halves from two linears, each with its own tensor scale: [E, 2].
        qg = mxmoe.quantize_nvfp4(w_gu[:, :i], two_level=True)
        qu = mxmoe.quantize_nvfp4(w_gu[:, i:] * 8, two_level=True)
        gu = mxmoe.Nvfp4Weights(torch.cat([qg.packed, qu.packed], 1), torch.cat([qg.scales, qu.scales], 1),
                                torch.stack([qg.tensor_scales, qu.tensor_scales], 1))
    else:
        gu = mxmoe.quantize_nvfp4(w_gu, two_level=True)
    dn = mxmoe.quantize_nvfp4(w_dn, two_level=False)
    gu = mxmoe.Nvfp4Weights(*(z.cuda() if z is not None else None for z in gu))
    dn = mxmoe.Nvfp4Weights(*(z.cuda() if z is not None else None for z in dn))
    gu_bf, dn_bf = mxmoe.dequantize_nvfp4(*gu), mxmoe.dequantize_nvfp4(*dn)
    kwargs = dict(limit=7.0 if activation == "gpt_oss" else None, activation=activation)
    if activation == "gpt_oss":
        kwargs.update(alpha=1.702, clamp_boundary=mxmoe.torch_clamp_boundary(),
                      gate_up_bias=(torch.randn((e, 2 * i), generator=gen) * 0.3).to(bf16).cuda(),
                      down_bias=(torch.randn((e, h), generator=gen) * 0.3).to(bf16).cuda())

    def lora(k_dim, n):
        a = (torch.randn((e * r, k_dim), generator=gen) / k_dim**0.5).to(bf16).cuda()
        b = (torch.randn((n, e * r), generator=gen) * 0.1).to(bf16).cuda()
        return a, b

    gua, gub = lora(h, 2 * i)
    dna, dnb = lora(i, h)
    x0 = torch.randn((t, h), generator=gen).to(bf16).cuda()
    g0 = torch.rand((t, top_k), generator=gen).to(bf16).cuda()
    ids = _ids(t, e, top_k, gen)
    dy = torch.randn((t, h), generator=gen).to(bf16).cuda()

    def run(gate_up, down, strategy):
        leaves = [z.clone().requires_grad_() for z in (x0, g0, gua, gub, dna, dnb)]
        x, g, a1, b1, a2, b2 = leaves
        y = mxmoe.moe_block(x, ids, g, gate_up, down, (a1, b1, 2.0), (a2, b2, 2.0),
                            strategy=strategy, **kwargs)
        y.backward(dy)
        return y, [z.grad for z in leaves]

    y_bf, grads_bf = run(gu_bf, dn_bf, "auto")
    for strategy in ("auto", "selective", "fused"):
        y_nv, grads_nv = run(gu, dn, strategy)
        assert y_nv.shape == (t, h)
        assert rel_err(y_nv, y_bf) < 1e-2, strategy
        for got, want in zip(grads_nv, grads_bf):
            assert rel_err(got, want) < 2e-2, strategy
    # NVFP4 weights on one projection only, bf16 on the other.
    y_mixed, _ = run(gu, dn_bf, "auto")
    assert rel_err(y_mixed, y_bf) < 1e-2


@cuda
def test_fused_strategy_needs_k_a_multiple_of_32_for_nvfp4():
    # K = 48: valid NVFP4 (K % 16 == 0), but the fused kernels stage 32-k runs of packed bytes.
    gen = torch.Generator().manual_seed(9)
    w = torch.randn((4, 64, 48), generator=gen)
    q = mxmoe.Nvfp4Weights(*(z.cuda() for z in mxmoe.quantize_nvfp4(w, two_level=True)))
    x = torch.randn((8, 48), generator=gen).to(bf16).cuda()
    ids = _ids(8, 4, 2, gen)
    with pytest.raises(mxmoe.MxmoeError, match=r'fused NVFP4 kernels need K % 32 == 0 \(K is 48\).*"selective" or "auto"'):
        mxmoe.expert_linear(x, ids, q, strategy="fused")
    layer = mxmoe.MxExpertLinear.from_weight(w.cuda(), rank=2, weight_format="nvfp4", strategy="fused")
    with pytest.raises(mxmoe.MxmoeError, match="fused NVFP4 kernels need K % 32 == 0"):
        layer(x, ids)
    # Auto takes Strategy A there and matches the dequantized weights.
    y = mxmoe.expert_linear(x, ids, q, strategy="auto")
    want = mxmoe.expert_linear(x, ids, mxmoe.dequantize_nvfp4(*q, dtype=bf16), strategy="auto")
    assert rel_err(y, want) < 1e-2


@cuda
def test_bad_nvfp4_metadata_is_refused_by_the_native_layer():
    gen = torch.Generator().manual_seed(10)
    q = mxmoe.Nvfp4Weights(*(z.cuda() for z in mxmoe.quantize_nvfp4(torch.randn((4, 32, 64), generator=gen),
                                                                     two_level=True)))
    x = torch.randn((8, 64), generator=gen).to(bf16).cuda()
    ids = _ids(8, 4, 2, gen)

    def err(weights):
        with pytest.raises(mxmoe.MxmoeError) as e:
            mxmoe.expert_linear(x, ids, weights, allow_nan_scales=True)
        return str(e.value)

    assert err((q.packed, q.scales.float(), q.tensor_scales)) == "NVFP4 scales: expected dtype u8, got f32"
    assert err((q.packed, q.scales[:, :, :2].contiguous(), q.tensor_scales)) == (
        "NVFP4 scales: expected [4, 32, 4] ([E, N, K/16] for packed [4, 32, 32]), got [4, 32, 2]"
    )
    assert err((q.packed, q.scales, q.tensor_scales.to(bf16))) == (
        "NVFP4 tensor_scales: expected dtype f32, got bf16"
    )
    assert err((q.packed, q.scales, q.tensor_scales[:3])).startswith(
        "NVFP4 tensor_scales: expected [4] or [4, G]"
    )
    assert err((q.packed, q.scales, torch.ones((4, 3), device="cuda"))) == (
        "NVFP4 tensor scales: 3 groups do not divide the 32 rows of an expert"
    )
    assert err((q.packed.to(torch.int32), q.scales, q.tensor_scales)) == (
        "NVFP4 packed: expected dtype u8, got i32"
    )
    assert err((q.packed, q.scales, q.tensor_scales.cpu())).startswith(
        "NVFP4 tensor_scales: expected a tensor on cuda:"
    )
    # The strided (non-contiguous) view is made contiguous by the Python layer; the result agrees.
    y = mxmoe.expert_linear(x, ids, q)
    y2 = mxmoe.expert_linear(x, ids, (q.packed, q.scales.transpose(0, 1).contiguous().transpose(0, 1),
                                      q.tensor_scales))
    assert torch.equal(y, y2)


@cuda
def test_nvfp4_moe_block_lora_training_reduces_the_loss():
    torch.manual_seed(0)
    e, h, i, t, top_k, r = 8, 128, 128, 64, 2, 8
    block = mxmoe.MxMoeBlock.from_weights(
        (torch.randn((e, 2 * i, h)) / h**0.5).cuda(),
        (torch.randn((e, h, i)) / i**0.5).cuda(),
        rank=r, lora_alpha=16, weight_format="nvfp4", two_level=True,
    )
    router = torch.nn.Linear(h, e, bias=False).cuda()
    x = torch.randn((t, h)).to(bf16).cuda()
    target = torch.randn((t, h)).cuda() * 0.1
    opt = torch.optim.Adam(list(block.parameters()) + list(router.parameters()), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        ids, gates = mxmoe.route_topk(router(x.float()), top_k)
        loss = F.mse_loss(block(x, ids, gates).float(), target)
        loss.backward()
        assert block.gate_up.lora_A.grad is not None and block.down.lora_B.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
