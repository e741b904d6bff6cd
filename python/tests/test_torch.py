"""torch tests. Without torch they skip; without CUDA only the CPU ones run.

GPU tests compare mxmoe's forward and backward with a plain PyTorch reference (MXFP4 decoded in
torch, per-expert matmuls, LoRA), with f32 math and bf16 rounding at the library's rounding
points, at SPEC-like shapes, and run short LoRA training loops.
"""

import os
import pathlib

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import mxmoe  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
bf16 = torch.bfloat16

GOLDEN = pathlib.Path(
    os.environ.get(
        "MXMOE_GOLDEN",
        pathlib.Path(__file__).resolve().parents[2]
        / "tests/data/golden/mxfp4_golden_torchao.safetensors",
    )
)

# E2M1 codes 0..15: sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M1 = _E2M1 + [-v for v in _E2M1]


def torch_dequantize(packed, scales):
    """MXFP4 → f32 in plain torch (even k in the low nibble, scale 2^(b-127), 255 = NaN)."""
    lut = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    p = packed.to(torch.int64)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    vals = lut[codes].double()
    b = scales.view(torch.uint8).to(torch.float64)
    scale = torch.exp2(b - 127.0)  # exact in f64, including 2^-127
    scale = torch.where(b == 255, torch.full_like(scale, float("nan")), scale)
    return (vals * scale.repeat_interleave(32, dim=-1)).float()


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def ref_linear(x, ids, w, lora=None, gates=None, bias=None):
    """Reference expert linear. x: [T, K] (fan-out over k slots) or [T*k, K] (per slot);
    w: [E, N, K] f32; lora: (A [E*r, K], B [N, E*r], s); bias [E, N] (added before the per-slot
    rounding). Output [T*k, N], or [T, N] with gates. Rounding points as in mxmoe: bf16(x A^T),
    per-slot output, gated sum."""
    t, k = ids.shape
    e_count, n, _ = w.shape
    xs = x.float()
    if xs.shape[0] == t and k > 1:
        xs = xs.repeat_interleave(k, dim=0)
    flat = ids.reshape(-1)
    out = torch.zeros((t * k, n), dtype=torch.float32, device=x.device)
    for e in range(e_count):
        m = flat == e
        if not bool(m.any()):
            continue
        xe = xs[m]
        y = xe @ w[e].T
        if lora is not None:
            a, b, s = lora
            r = a.shape[0] // e_count
            xa = xe @ a[e * r:(e + 1) * r].float().T
            hi = xa.to(bf16).float()  # the forward epilogue reads XA as two bf16 terms
            xa = hi + (xa - hi).to(bf16).float()
            y = y + s * (xa @ b[:, e * r:(e + 1) * r].float().T)
        if bias is not None:
            y = y + bias[e].float()
        out[m] = y
    out = out.to(bf16).float()
    if gates is None:
        return out
    return (out.view(t, k, n) * gates.float().unsqueeze(-1)).sum(dim=1).to(bf16).float()


def ref_moe(x, ids, gates, w_gu, w_dn, gu_lora, dn_lora, limit=None):
    gu = ref_linear(x, ids, w_gu, gu_lora)
    i = w_gu.shape[1] // 2
    g, u = gu[:, :i], gu[:, i:]
    if limit is not None:
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
    h = (F.silu(g) * u).to(bf16).float()
    return ref_linear(h, ids, w_dn, dn_lora, gates)


def ref_gpt_oss_moe(x, ids, gates, w_gu, w_dn, gu_lora, dn_lora, b_gu, b_dn, alpha, limit):
    """gpt-oss's block (GPT_OSS.md §1) at mxmoe's rounding points: interleaved gate/up (gate
    2i, up 2i+1), the gate/up bias before the activation, the down bias before the gates."""
    gu = ref_linear(x, ids, w_gu, gu_lora, bias=b_gu)
    g = gu[:, 0::2].clamp(max=limit)
    u = gu[:, 1::2].clamp(-limit, limit)
    h = ((u + 1) * g * torch.sigmoid(alpha * g)).to(bf16).float()
    return ref_linear(h, ids, w_dn, dn_lora, gates, bias=b_dn)


def random_ids(t, e, k, gen, device, drop_one=False):
    ids = torch.rand((t, e), generator=gen, device="cpu").topk(k, dim=-1).indices
    if drop_one:
        ids[0, -1] = -1
    return ids.to(device)


def make_problem(e, k_dim, n, t, top_k, r, s, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((e, n, k_dim), generator=gen) * 0.05
    packed, scales = mxmoe.quantize(w)
    x = torch.randn((t, k_dim), generator=gen).to(bf16)
    a = (torch.randn((e * r, k_dim), generator=gen) / k_dim**0.5).to(bf16)
    b = (torch.randn((n, e * r), generator=gen) * 0.1).to(bf16)
    gates = torch.rand((t, top_k), generator=gen).to(bf16)
    return dict(
        packed=packed.to(device),
        scales=scales.to(device),
        x=x.to(device),
        a=a.to(device),
        b=b.to(device),
        s=s,
        gates=gates.to(device),
        gen=gen,
    )


# ---------------------------------------------------------------------------------------------
# CPU (torch, no GPU needed).


def test_quantize_tensor_matches_golden():
    if not GOLDEN.exists():
        pytest.skip("golden file not found")
    g = mxmoe.read_safetensors(GOLDEN)

    def tensor(name, dtype):
        _, shape, data = g[name]
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    w = tensor("input_bf16", bf16)
    packed, scales = mxmoe.quantize(w)
    assert torch.equal(packed, tensor("packed", torch.uint8))
    assert torch.equal(scales, tensor("scales", torch.uint8))
    deq = mxmoe.dequantize(packed, scales)
    want = tensor("dequantized_bf16", bf16)
    assert torch.equal(deq.view(torch.int16), want.view(torch.int16))
    # The plain-torch decoder used as the GPU tests' reference agrees (NaN positions included).
    ours = torch_dequantize(packed, scales)
    assert torch.equal(ours.to(bf16).view(torch.int16), want.view(torch.int16))


def test_cpu_tensors_are_rejected_clearly():
    x = torch.zeros((4, 32), dtype=bf16)
    ids = torch.zeros((4, 1), dtype=torch.int64)
    packed, scales = mxmoe.quantize(torch.zeros((1, 8, 32)))
    with pytest.raises(mxmoe.MxmoeError, match="CUDA device"):
        mxmoe.expert_linear(x, ids, (packed, scales))


def test_nan_scales_are_rejected_before_any_launch():
    packed, scales = mxmoe.quantize(torch.zeros((2, 8, 64)))
    scales[1, 5, 1] = 255
    with pytest.raises(mxmoe.MxmoeError, match="expert 1, row 5, block 1"):
        mxmoe.check_scales(scales)
    with pytest.raises(mxmoe.MxmoeError, match="allow_nan_scales=True"):
        mxmoe.dequantize(packed, scales)
    deq = mxmoe.dequantize(packed, scales, allow_nan_scales=True)
    assert torch.isnan(deq[1, 5, 32:64].float()).all()
    assert not torch.isnan(deq[1, 5, :32].float()).any()
    x = torch.zeros((4, 64), dtype=bf16)
    ids = torch.zeros((4, 1), dtype=torch.int64)
    with pytest.raises(mxmoe.MxmoeError, match="expert 1, row 5, block 1"):
        mxmoe.expert_linear(x, ids, (packed, scales))
    # The opt-in skips the check (the CPU tensors are then refused by the native layer).
    with pytest.raises(mxmoe.MxmoeError, match="CUDA device"):
        mxmoe.expert_linear(x, ids, (packed, scales), allow_nan_scales=True)
    layer = mxmoe.MxExpertLinear(2, 64, 8, rank=0)
    layer.scales[0, 0, 0] = 255
    with pytest.raises(mxmoe.MxmoeError, match="expert 0, row 0, block 0"):
        layer(x, ids)


# ---------------------------------------------------------------------------------------------
# GPU.

SHAPES = [
    # E, K, N, T, top_k, r, s
    pytest.param((8, 128, 256, 16, 2, 8, 0.5), id="E8-K128-N256-T16-k2-r8"),
    pytest.param((32, 2048, 1024, 64, 4, 16, 2.0), id="E32-K2048-N1024-T64-k4-r16"),
]


@cuda
def test_dequantize_on_device_matches_torch_decoder():
    p = make_problem(8, 128, 256, 4, 2, 8, 0.5, seed=0)
    want = torch_dequantize(p["packed"], p["scales"]).to(bf16)
    got = mxmoe.dequantize(p["packed"], p["scales"])
    assert got.device == p["packed"].device
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
@pytest.mark.parametrize("strategy", ["fused", "selective"])
def test_expert_linear_forward_backward_match_reference(shape, gated, strategy):
    e, k_dim, n, t, top_k, r, s = shape
    p = make_problem(e, k_dim, n, t, top_k, r, s, seed=1)
    ids = random_ids(t, e, top_k, p["gen"], "cuda", drop_one=(e == 8))
    w = torch_dequantize(p["packed"], p["scales"])

    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    gates = p["gates"].clone().requires_grad_() if gated else None
    y = mxmoe.expert_linear(x, ids, (p["packed"], p["scales"]), a, b, s, gates, strategy=strategy)
    assert y.shape == ((t, n) if gated else (t * top_k, n)) and y.dtype == bf16

    xr = p["x"].float().requires_grad_()
    ar = p["a"].float().requires_grad_()
    br = p["b"].float().requires_grad_()
    gr = p["gates"].float().requires_grad_() if gated else None
    yr = ref_linear(xr, ids, w, (ar, br, s), gr)
    assert rel_err(y, yr) < 2e-2

    dy = torch.randn(y.shape, generator=p["gen"]).to(bf16).cuda()
    y.backward(dy)
    yr.backward(dy.float())
    assert rel_err(x.grad, xr.grad) < 3e-2
    assert rel_err(a.grad, ar.grad) < 3e-2
    assert rel_err(b.grad, br.grad) < 3e-2
    if gated:
        assert rel_err(gates.grad, gr.grad) < 3e-2


@cuda
def test_bf16_weights_and_no_lora():
    p = make_problem(8, 128, 256, 16, 2, 8, 0.5, seed=2)
    w = torch_dequantize(p["packed"], p["scales"]).to(bf16)
    ids = random_ids(16, 8, 2, p["gen"], "cuda")
    x = p["x"].clone().requires_grad_()
    y = mxmoe.expert_linear(x, ids, w)
    xr = p["x"].float().requires_grad_()
    yr = ref_linear(xr, ids, w.float())
    assert rel_err(y, yr) < 2e-2
    dy = torch.randn(y.shape, generator=p["gen"]).to(bf16).cuda()
    y.backward(dy)
    yr.backward(dy.float())
    assert rel_err(x.grad, xr.grad) < 3e-2


@cuda
def test_runs_on_torch_current_stream():
    p = make_problem(8, 128, 256, 16, 2, 8, 0.5, seed=3)
    ids = random_ids(16, 8, 2, p["gen"], "cuda")
    args = (ids, (p["packed"], p["scales"]), p["a"], p["b"], 0.5)
    base = mxmoe.expert_linear(p["x"], *args, strategy="fused")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x2 = p["x"] * 1  # produced on the side stream
        y2 = mxmoe.expert_linear(x2, *args, strategy="fused")
        y2 = y2 + 0  # consumed on the side stream, ordered after mxmoe's kernels
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(base, y2)


@cuda
def test_outputs_are_zero_copy_and_freed_when_torch_drops_them():
    # Outputs are mxmoe's buffers handed over by DLPack: writable torch tensors that own them.
    # Dropping them must give the memory back (no leak across many steps).
    p = make_problem(32, 2048, 1024, 64, 4, 16, 0.5, seed=4)
    ids = random_ids(64, 32, 4, p["gen"], "cuda")
    args = (ids, (p["packed"], p["scales"]), p["a"], p["b"], 0.5)

    def step():
        x = p["x"].clone().requires_grad_()
        y = mxmoe.expert_linear(x, *args, strategy="fused")
        assert y.is_cuda and y.dtype == bf16 and y.is_contiguous()
        y.mul_(1.0)  # torch may write into the exported buffer
        y.float().square().mean().backward()
        return x.grad.float().abs().sum().item()

    first = step()
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    for _ in range(30):
        assert step() == first  # deterministic
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    # One step's outputs are ~1 MB; 30 leaked steps would hold far more than this margin.
    assert free_before - free_after < 16 << 20, (free_before, free_after)


@cuda
def test_gpu_errors_carry_the_library_message():
    p = make_problem(8, 128, 256, 16, 2, 8, 0.5, seed=4)
    ids = random_ids(16, 8, 2, p["gen"], "cuda")
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.expert_linear(p["x"].float(), ids, (p["packed"], p["scales"]))
    assert str(err.value) == "x: expected dtype bf16, got f32"
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.expert_linear(p["x"][:, :64].contiguous(), ids, (p["packed"], p["scales"]))
    assert str(err.value) == "x: expected 128 columns (K), got 64 columns"
    with pytest.raises(mxmoe.MxmoeError) as err:
        a_bad = p["a"][:, :64].contiguous()
        mxmoe.expert_linear(p["x"], ids, (p["packed"], p["scales"]), a_bad, p["b"], 0.5)
    assert str(err.value) == "lora_A: expected [64, 128] (E·r, K), got [64, 64]"
    # retain_graph: the saved state is consumed by the first backward.
    x = p["x"].clone().requires_grad_()
    y = mxmoe.expert_linear(x, ids, (p["packed"], p["scales"]), strategy="fused")
    y.sum().backward(retain_graph=True)
    with pytest.raises(mxmoe.MxmoeError, match="retain_graph"):
        y.sum().backward()


MOE_SHAPES = [
    # E, H, I, T, top_k, r
    pytest.param((8, 128, 128, 16, 2, 8), id="E8-H128-I128-T16-k2-r8"),
    pytest.param((32, 2048, 512, 64, 4, 16), id="E32-H2048-I512-T64-k4-r16"),
]


@cuda
@pytest.mark.parametrize("shape", MOE_SHAPES)
@pytest.mark.parametrize("limit", [None, 10.0], ids=["nolimit", "limit10"])
def test_moe_block_forward_backward_match_reference(shape, limit):
    e, h, i, t, top_k, r = shape
    gen = torch.Generator().manual_seed(5)
    w_gu = torch.randn((e, 2 * i, h), generator=gen) / h**0.5
    w_dn = torch.randn((e, h, i), generator=gen) / i**0.5
    gu_p, gu_s = (z.cuda() for z in mxmoe.quantize(w_gu))
    dn_p, dn_s = (z.cuda() for z in mxmoe.quantize(w_dn))
    wq_gu, wq_dn = torch_dequantize(gu_p, gu_s), torch_dequantize(dn_p, dn_s)

    def lora(k_dim, n):
        a = (torch.randn((e * r, k_dim), generator=gen) / k_dim**0.5).to(bf16).cuda()
        b = (torch.randn((n, e * r), generator=gen) * 0.1).to(bf16).cuda()
        return a, b

    gua, gub = lora(h, 2 * i)
    dna, dnb = lora(i, h)
    x0 = torch.randn((t, h), generator=gen).to(bf16).cuda()
    ids = random_ids(t, e, top_k, gen, "cuda")
    g0 = torch.rand((t, top_k), generator=gen).to(bf16).cuda()

    leaves = [z.clone().requires_grad_() for z in (x0, g0, gua, gub, dna, dnb)]
    x, g, a1, b1, a2, b2 = leaves
    y = mxmoe.moe_block(x, ids, g, (gu_p, gu_s), (dn_p, dn_s), (a1, b1, 2.0), (a2, b2, 2.0),
                        limit=limit, strategy="fused")
    refs = [z.float().requires_grad_() for z in (x0, g0, gua, gub, dna, dnb)]
    xr, gr, a1r, b1r, a2r, b2r = refs
    yr = ref_moe(xr, ids, gr, wq_gu, wq_dn, (a1r, b1r, 2.0), (a2r, b2r, 2.0), limit)
    assert y.shape == (t, h)
    assert rel_err(y, yr) < 3e-2
    dy = torch.randn(y.shape, generator=gen).to(bf16).cuda()
    y.backward(dy)
    yr.backward(dy.float())
    for got, want in zip(leaves, refs):
        assert rel_err(got.grad, want.grad) < 5e-2


GPT_OSS_SHAPES = [
    # E, H, I, T, top_k, r
    pytest.param((8, 64, 96, 32, 4, 8), id="E8-H64-I96-T32-k4-r8"),
    pytest.param((8, 192, 160, 24, 4, 1), id="E8-H192-I160-T24-k4-r1-tails"),
]


@cuda
@pytest.mark.parametrize("shape", GPT_OSS_SHAPES)
@pytest.mark.parametrize("strategy", ["fused", "selective"])
def test_gpt_oss_block_forward_backward_match_reference(shape, strategy):
    e, h, i, t, top_k, r = shape
    # A limit that clamps a few percent of these N(0, 1)-ish values; bf16 gate/up values land on
    # exactly ±2.0 often enough that the boundary rule matters (checked on an H100: with the other
    # rule than torch's, dx is 18 % off).
    alpha, limit = 1.702, 2.0
    gen = torch.Generator().manual_seed(11)
    w_gu = torch.randn((e, 2 * i, h), generator=gen) / h**0.5
    w_dn = torch.randn((e, h, i), generator=gen) / i**0.5
    gu_p, gu_s = (z.cuda() for z in mxmoe.quantize(w_gu))
    dn_p, dn_s = (z.cuda() for z in mxmoe.quantize(w_dn))
    wq_gu, wq_dn = torch_dequantize(gu_p, gu_s), torch_dequantize(dn_p, dn_s)
    b_gu = (torch.randn((e, 2 * i), generator=gen) * 0.5).to(bf16).cuda()
    b_dn = (torch.randn((e, h), generator=gen) * 0.5).to(bf16).cuda()

    def lora(k_dim, n):
        a = (torch.randn((e * r, k_dim), generator=gen) / k_dim**0.5).to(bf16).cuda()
        b = (torch.randn((n, e * r), generator=gen) * 0.3).to(bf16).cuda()
        return a, b

    gua, gub = lora(h, 2 * i)
    dna, dnb = lora(i, h)
    x0 = torch.randn((t, h), generator=gen).to(bf16).cuda()
    ids = random_ids(t, e, top_k, gen, "cuda", drop_one=True)
    g0 = torch.rand((t, top_k), generator=gen).to(bf16).cuda()

    leaves = [z.clone().requires_grad_() for z in (x0, g0, gua, gub, dna, dnb)]
    x, g, a1, b1, a2, b2 = leaves
    y = mxmoe.moe_block(x, ids, g, (gu_p, gu_s), (dn_p, dn_s), (a1, b1, 2.0), (a2, b2, 2.0),
                        limit=limit, strategy=strategy, activation="gpt_oss", alpha=alpha,
                        clamp_boundary=mxmoe.torch_clamp_boundary(), gate_up_bias=b_gu, down_bias=b_dn)
    refs = [z.float().requires_grad_() for z in (x0, g0, gua, gub, dna, dnb)]
    xr, gr, a1r, b1r, a2r, b2r = refs
    yr = ref_gpt_oss_moe(xr, ids, gr, wq_gu, wq_dn, (a1r, b1r, 2.0), (a2r, b2r, 2.0),
                         b_gu, b_dn, alpha, limit)
    assert y.shape == (t, h)
    assert rel_err(y, yr) < 3e-2
    # The biases and the gpt-oss form matter: the SwiGLU block on the same inputs is far off.
    y_swiglu = mxmoe.moe_block(x0, ids, g0, (gu_p, gu_s), (dn_p, dn_s), (gua, gub, 2.0),
                               (dna, dnb, 2.0), limit=limit, strategy=strategy)
    assert rel_err(y_swiglu, yr) > 0.2
    dy = torch.randn(y.shape, generator=gen).to(bf16).cuda()
    y.backward(dy)
    yr.backward(dy.float())
    for got, want in zip(leaves, refs):
        assert rel_err(got.grad, want.grad) < 5e-2
    with pytest.raises(mxmoe.MxmoeError, match="activation"):
        mxmoe.moe_block(x0, ids, g0, (gu_p, gu_s), (dn_p, dn_s), activation="geglu")
    with pytest.raises(mxmoe.MxmoeError, match="gate_up bias"):
        mxmoe.moe_block(x0, ids, g0, (gu_p, gu_s), (dn_p, dn_s), activation="gpt_oss",
                        gate_up_bias=b_dn, down_bias=b_dn)


@cuda
def test_device_module_names_the_loaded_ptx_module():
    info = mxmoe.device_module()
    assert info.split(" ")[0] in ("hopper", "portable"), info
    if torch.cuda.get_device_capability() == (9, 0) and not os.environ.get("MXMOE_MODULE"):
        assert info.startswith("hopper (sm_90a"), info


@cuda
def test_lora_training_reduces_the_loss_on_an_mxfp4_projection():
    torch.manual_seed(0)
    e, k_dim, n, t, top_k, r = 8, 128, 256, 64, 2, 8
    w = torch.randn((e, n, k_dim)) * 0.05
    layer = mxmoe.MxExpertLinear.from_weight(w.cuda(), rank=r, lora_alpha=16, strategy="fused")
    teacher_a = (torch.randn((e * r, k_dim)) / k_dim**0.5).to(bf16).cuda()
    teacher_b = (torch.randn((n, e * r)) * 0.2).to(bf16).cuda()
    x = torch.randn((t, k_dim)).to(bf16).cuda()
    ids = random_ids(t, e, top_k, torch.Generator().manual_seed(1), "cuda")
    with torch.no_grad():
        target = mxmoe.expert_linear(x, ids, (layer.packed, layer.scales), teacher_a, teacher_b,
                                     layer.scaling, strategy="fused").float()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(layer(x, ids).float(), target)
        loss.backward()
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@cuda
def test_moe_block_training_with_a_torch_router_reduces_the_loss():
    torch.manual_seed(0)
    e, h, i, t, top_k, r = 8, 128, 128, 64, 2, 8
    block = mxmoe.MxMoeBlock.from_weights(
        (torch.randn((e, 2 * i, h)) / h**0.5).cuda(),
        (torch.randn((e, h, i)) / i**0.5).cuda(),
        rank=r, lora_alpha=16, strategy="fused",
    )
    router = torch.nn.Linear(h, e, bias=False).cuda()
    x = torch.randn((t, h)).to(bf16).cuda()
    target = torch.randn((t, h)).cuda() * 0.1
    params = [p for p in block.parameters()] + list(router.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        ids, gates = mxmoe.route_topk(router(x.float()), top_k)
        loss = F.mse_loss(block(x, ids, gates).float(), target)
        loss.backward()
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
