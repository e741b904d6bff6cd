"""mxmoe.distributed: the expert-parallel MoE block (issue #19).

CPU tests (CI): world size 1 is the local block, exactly; the eager SwiGLU block (the CPU local
compute) against mxmoe's CPU reference (``run_file``, the library's own formula); 2 and 4 ranks
with the gloo backend (``torch.multiprocessing.spawn``, a ``file://`` rendezvous in a temporary
folder, so no port is used) in fp32 against the single-process block holding all experts, on the
same inputs: ``y``, ``dx``, ``d_gates`` and every rank's LoRA A/B gradients (the matching slices
of the reference's); SwiGLU and gpt-oss; uneven loads; a rank with no tokens and a rank whose
experts receive nothing; dropped slots; dense weights with SwiGLU's clamp; ``E % W != 0``.

GPU tests (skip without CUDA and the driver, and unless at least 2 devices are visible): the same
cases with NCCL, 2 and 4 ranks, bf16, against mxmoe's single-GPU ``moe_block`` on the same inputs.
"""

import datetime
import os
import sys
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import mxmoe  # noqa: E402
from mxmoe import distributed as md  # noqa: E402

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HAVE_GPU = torch.cuda.is_available() and mxmoe.driver_present()
multi_gpu = pytest.mark.skipif(
    not (HAVE_GPU and torch.cuda.device_count() >= 2),
    reason="needs at least 2 CUDA devices and the CUDA driver",
)
bf16, f32 = torch.bfloat16, torch.float32


def _have_transformers():
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) >= 5


# ---------------------------------------------------------------------------------------------
# Problems: the full layer (all experts, all ranks' tokens), built the same on every rank.


def build(seed, *, experts=8, hidden=64, inter=32, top_k=2, r=4, tokens=(5, 7, 3, 6), route="random",
          activation="swiglu", drop=False, device="cpu", dtype=f32, world=2, limit=None,
          weight_format="mxfp4"):
    """Full weights, LoRA, biases and per-rank tokens. ``route``: ``"random"``, ``"uneven"`` (most
    slots on rank 0's experts), ``"skip_last"`` (no slot on the last rank's experts)."""
    gen = torch.Generator().manual_seed(seed)
    e, h, i = experts, hidden, inter
    el = e // world
    gu = torch.randn((e, 2 * i, h), generator=gen) * 0.1
    dn = torch.randn((e, h, i), generator=gen) * 0.1
    gu_packed, gu_scales = mxmoe.quantize(gu)
    dn_packed, dn_scales = mxmoe.quantize(dn)
    gu_dense = mxmoe.dequantize(gu_packed, gu_scales, f32)
    dn_dense = mxmoe.dequantize(dn_packed, dn_scales, f32)
    lora = dict(
        gu_a=torch.randn((e * r, h), generator=gen) / h**0.5,
        gu_b=torch.randn((2 * i, e * r), generator=gen) * 0.2,
        dn_a=torch.randn((e * r, i), generator=gen) / i**0.5,
        dn_b=torch.randn((h, e * r), generator=gen) * 0.2,
    )
    biases = None
    if activation == "gpt_oss":
        biases = (torch.randn((e, 2 * i), generator=gen) * 0.5, torch.randn((e, h), generator=gen) * 0.5)
    xs, ids, gates, dys = [], [], [], []
    for t in tokens[:world]:
        xs.append(torch.randn((t, h), generator=gen))
        if route == "random":
            idx = torch.rand((t, e), generator=gen).topk(top_k, dim=-1).indices
        elif route == "uneven":
            # ~90% of slots on rank 0's experts, the rest anywhere.
            idx = torch.rand((t, el), generator=gen).topk(top_k, dim=-1).indices
            far = torch.rand((t, e), generator=gen).topk(top_k, dim=-1).indices
            pick = torch.rand((t, top_k), generator=gen) < 0.1
            idx = torch.where(pick & (far >= el), far, idx)
            idx = torch.where(pick, idx, idx % el)
        elif route == "skip_last":
            idx = torch.rand((t, e - el), generator=gen).topk(top_k, dim=-1).indices
        else:
            raise ValueError(route)
        if drop and t > 0:
            idx[0, :] = -1  # a token with every slot dropped
            idx[t // 2, -1] = -1
        ids.append(idx)
        gates.append(torch.rand((t, top_k), generator=gen))
        dys.append(torch.randn((t, h), generator=gen))
    cast = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        e=e, h=h, i=i, r=r, world=world, activation=activation, limit=limit, weight_format=weight_format,
        gu=(gu_packed.to(device), gu_scales.to(device)), dn=(dn_packed.to(device), dn_scales.to(device)),
        gu_dense=cast(gu_dense), dn_dense=cast(dn_dense),
        lora={k: cast(v) for k, v in lora.items()},
        biases=None if biases is None else tuple(cast(b) for b in biases),
        xs=[cast(x) for x in xs], ids=[x.to(device) for x in ids], gates=[cast(g) for g in gates],
        dys=[cast(d) for d in dys], device=device, dtype=dtype,
    )


def _block_kwargs(case):
    if case["activation"] == "gpt_oss":
        return dict(activation="gpt_oss", alpha=1.702, limit=7.0, clamp_boundary=mxmoe.torch_clamp_boundary(),
                    gate_up_bias=case["biases"][0], down_bias=case["biases"][1])
    return dict(limit=case["limit"])


def reference(case, scaling=2.0):
    """The single-process block with every expert on every rank's tokens: y, dx, d_gates (per
    rank) and the full LoRA gradients."""
    x = torch.cat(case["xs"]).detach().requires_grad_(True)
    ids = torch.cat(case["ids"])
    gates = torch.cat(case["gates"]).detach().requires_grad_(True)
    lora = {k: v.detach().clone().requires_grad_(True) for k, v in case["lora"].items()}
    y = md.local_moe_block(
        x, ids, gates, case["gu"], case["dn"], (lora["gu_a"], lora["gu_b"], scaling),
        (lora["dn_a"], lora["dn_b"], scaling), **_block_kwargs(case),
    )
    (y.float() * torch.cat(case["dys"]).float()).sum().backward()
    sizes = [x_.shape[0] for x_ in case["xs"]]
    return dict(
        y=y.detach().split(sizes), dx=x.grad.split(sizes), d_gates=gates.grad.split(sizes),
        lora={k: v.grad for k, v in lora.items()},
    )


def run_module(case, rank, group=None, scaling=2.0):
    """This rank's part through ``ExpertParallelMoe``: (y, dx, d_gates, module)."""
    kw = dict(activation=case["activation"], group=group, dtype=case["dtype"], device=case["device"],
              weight_format=case["weight_format"])
    if case["activation"] == "gpt_oss":
        kw.update(alpha=1.702, limit=7.0, clamp_boundary=mxmoe.torch_clamp_boundary())
        bias = dict(gate_up_bias=case["biases"][0], down_bias=case["biases"][1])
    else:
        kw.update(limit=case["limit"])
        bias = {}
    m = md.ExpertParallelMoe.from_weights(case["gu_dense"], case["dn_dense"], rank=case["r"],
                                          lora_alpha=scaling * case["r"], **kw, **bias)
    lo = case["lora"]
    m.load_lora(lo["gu_a"], lo["gu_b"], lo["dn_a"], lo["dn_b"])
    x = case["xs"][rank].detach().clone().requires_grad_(True)
    gates = case["gates"][rank].detach().clone().requires_grad_(True)
    y = m(x, case["ids"][rank], gates)
    (y.float() * case["dys"][rank].float()).sum().backward()
    return y.detach(), x.grad, gates.grad, m


def rel_err(got, want):
    got, want = got.float(), want.float()
    if want.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def check_rank(case, rank, group, tol):
    """Runs the module on this rank and compares everything this rank holds with the reference."""
    ref = reference(case)
    y, dx, d_gates, m = run_module(case, rank, group)
    problems = []

    def cmp(what, got, want):
        if got is None:
            problems.append(f"{what}: no gradient")
            return
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{what}: shape {list(got.shape)} vs {list(want.shape)}")
            return
        err = rel_err(got, want)
        if not err <= tol:
            problems.append(f"{what}: rel err {err:.3g} > {tol:.3g}")

    cmp("y", y, ref["y"][rank])
    cmp("dx", dx, ref["dx"][rank])
    cmp("d_gates", d_gates, ref["d_gates"][rank])
    full = ref["lora"]
    for name, key, which in (("gate_up_lora_A", "gu_a", "A"), ("gate_up_lora_B", "gu_b", "B"),
                             ("down_lora_A", "dn_a", "A"), ("down_lora_B", "dn_b", "B")):
        cmp(f"{name}.grad", getattr(m, name).grad, m.lora_slice(full[key], which))
    return problems


# ---------------------------------------------------------------------------------------------
# Multi-rank cases (run inside every spawned rank; each builds its full problem from a seed).


def _cases(device, dtype, world):
    """{name: case kwargs}. Token counts per rank; rank 1 has none in "empty_rank"."""
    big = dict(experts=4 * world, hidden=256, inter=256, top_k=4, r=8) if device == "cuda" else {}
    toks = (37, 64, 21, 50) if device == "cuda" else (5, 7, 3, 6)
    base = dict(device=device, dtype=dtype, world=world, tokens=toks, **big)
    cases = {
        "swiglu": dict(base, seed=1),
        "gpt_oss": dict(base, seed=2, activation="gpt_oss"),
        "uneven": dict(base, seed=3, route="uneven"),
        "empty_rank": dict(base, seed=4, route="skip_last", tokens=(toks[0], 0) + toks[2:]),
        "dropped": dict(base, seed=5, drop=True),
        "gpt_oss_uneven_dropped": dict(base, seed=6, activation="gpt_oss", route="uneven", drop=True),
        "swiglu_dense_limit": dict(base, seed=7, weight_format="dense", limit=0.5),
    }
    if not _have_transformers():  # the CPU gpt-oss block is mxmoe.gpt_oss's (needs transformers)
        if device == "cpu":
            cases = {k: v for k, v in cases.items() if "gpt_oss" not in k}
    return cases


def _worker(rank, world, backend, init_file, names, tol):
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = "cuda"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        dtype = bf16 if device == "cuda" else f32
        cases = _cases(device, dtype, world)
        failures = []
        for name in names:
            if name not in cases:
                continue
            try:
                problems = check_rank(build(**cases[name]), rank, None, tol)
            except Exception:  # noqa: BLE001 - reported with the case's name
                problems = [traceback.format_exc()]
            failures += [f"rank {rank}, case {name}: {p}" for p in problems]
            dist.barrier()
        # E % W != 0 (only where W does not divide 6).
        if 6 % world:
            try:
                md.ExpertParallelMoe(6, 64, 32, rank=2, dtype=dtype, device=device)
                failures.append(f"rank {rank}: E = 6 over {world} ranks did not raise")
            except mxmoe.MxmoeError as e:
                if "not divisible by the world size" not in str(e):
                    failures.append(f"rank {rank}: unexpected message {e}")
        if failures:
            raise AssertionError("\n".join(failures))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: with torch 2.15 on the CPU, a gloo rank that ran
    # the gpt-oss eager block sometimes aborts in a C++ destructor at exit ("terminate called
    # without an active exception", after destroy_process_group; cause not found), which
    # mp.spawn would report as a failure although every check passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world, backend, tmp_path, names, tol):
    init_file = tmp_path / f"rendezvous-{backend}-{world}"
    mp.spawn(_worker, args=(world, backend, str(init_file), list(names), tol), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------
# CPU tests.


def test_expert_range_and_divisibility():
    assert md.expert_range(8, 4, 0) == (0, 2)
    assert md.expert_range(8, 4, 3) == (6, 8)
    assert md.expert_range(128, 8, 5) == (80, 96)
    with pytest.raises(mxmoe.MxmoeError, match="num_experts = 6 is not divisible by the world size 4"):
        md.expert_range(6, 4, 0)
    with pytest.raises(mxmoe.MxmoeError, match="outside the group"):
        md.expert_range(8, 4, 4)
    assert md.group_info() == (1, 0)  # no process group: world size 1


@pytest.mark.parametrize("activation", ["swiglu", "gpt_oss"])
def test_world_size_one_is_the_local_block_exactly(activation):
    if activation == "gpt_oss" and not _have_transformers():
        pytest.skip("the CPU gpt-oss block needs transformers 5.x")
    case = build(10, world=1, activation=activation, drop=True, tokens=(9,))
    ref = reference(case)
    y, dx, d_gates, m = run_module(case, 0)
    assert m.world_size == 1 and (m.expert_start, m.expert_stop) == (0, case["e"])
    assert torch.equal(y, ref["y"][0])
    assert torch.equal(dx, ref["dx"][0])
    assert torch.equal(d_gates, ref["d_gates"][0])
    for name, key in (("gate_up_lora_A", "gu_a"), ("gate_up_lora_B", "gu_b"), ("down_lora_A", "dn_a"),
                      ("down_lora_B", "dn_b")):
        assert torch.equal(getattr(m, name).grad, ref["lora"][key])
    # The functional form with the same local pieces is the same call.
    y2 = mxmoe.ep_moe_block(case["xs"][0], case["ids"][0], case["gates"][0], case["gu"], case["dn"],
                            (case["lora"]["gu_a"], case["lora"]["gu_b"], 2.0),
                            (case["lora"]["dn_a"], case["lora"]["dn_b"], 2.0), **_block_kwargs(case))
    assert torch.equal(y2, ref["y"][0])


def test_dense_and_mxfp4_weights_agree_on_one_rank():
    case = build(11, world=1, tokens=(6,))
    lo = case["lora"]
    args = (case["xs"][0], case["ids"][0], case["gates"][0])
    y_mx = md.ep_moe_block(*args, case["gu"], case["dn"], (lo["gu_a"], lo["gu_b"], 1.0), None)
    y_dense = md.ep_moe_block(*args, case["gu_dense"], case["dn_dense"], (lo["gu_a"], lo["gu_b"], 1.0), None)
    torch.testing.assert_close(y_mx, y_dense, rtol=0, atol=0)


def _safetensors(tensors, metadata):
    """A safetensors file of torch tensors ({name: tensor}; bf16 or int32), through
    test_cpu's writer."""
    from test_cpu import _safetensors as write

    def raw(t):
        c = t.contiguous()
        return c.view(torch.uint8).numpy().tobytes() if c.numel() else b""

    return write({name: ({bf16: "BF16", torch.int32: "I32"}[t.dtype], t.shape, raw(t))
                  for name, t in tensors.items()}, metadata)


def _from_result(t):
    dtype, shape, data = t
    assert dtype == "BF16"
    return torch.frombuffer(bytearray(data), dtype=bf16).reshape(shape).float()


def test_eager_swiglu_block_matches_the_library_cpu_reference():
    """The CPU local compute of the SwiGLU block is moe_block's formula: gate half first, LoRA on
    both projections with their own scalings, gates, dropped slots (the library's CPU reference,
    bf16 rounding at its points, against the eager block in fp32 on the same bf16 inputs)."""
    gen = torch.Generator().manual_seed(12)
    e, h, i, r, t, k = 4, 32, 32, 2, 9, 2
    r16 = lambda v: v.to(bf16)  # noqa: E731
    gu = r16(torch.randn((e, 2 * i, h), generator=gen) * 0.2)
    dn = r16(torch.randn((e, h, i), generator=gen) * 0.2)
    x = r16(torch.randn((t, h), generator=gen))
    ids = torch.rand((t, e), generator=gen).topk(k, dim=-1).indices.to(torch.int32)
    ids[3, 1] = -1
    gates = r16(torch.rand((t, k), generator=gen))
    dy = r16(torch.randn((t, h), generator=gen))
    gua, gub = r16(torch.randn((e * r, h), generator=gen) * 0.3), r16(torch.randn((2 * i, e * r), generator=gen) * 0.3)
    dna, dnb = r16(torch.randn((e * r, i), generator=gen) * 0.3), r16(torch.randn((h, e * r), generator=gen) * 0.3)
    data = _safetensors(
        {"gate_up_proj": gu, "down_proj": dn, "expert_ids": ids, "x": x, "gates": gates, "dy": dy,
         "gate_up_lora_a": gua, "gate_up_lora_b": gub, "down_lora_a": dna, "down_lora_b": dnb},
        {"mode": "block", "scaling": "0.5", "down_scaling": "1.5"},
    )
    res = mxmoe.run_file(data, cpu=True)
    want = {name: _from_result(v) for name, v in res.tensors.items()}

    leaf = lambda v: v.float().requires_grad_(True)  # noqa: E731
    xl, gl, a1, b1, a2, b2 = (leaf(v) for v in (x, gates, gua, gub, dna, dnb))
    y = md.eager_moe_block(xl, ids.to(torch.int64), gl, gu.float(), dn.float(), (a1, b1, 0.5), (a2, b2, 1.5))
    (y * dy.float()).sum().backward()
    got = {"out": y.detach(), "d_x": xl.grad, "d_gates": gl.grad, "d_gate_up_lora_a": a1.grad,
           "d_gate_up_lora_b": b1.grad, "d_down_lora_a": a2.grad, "d_down_lora_b": b2.grad}
    assert set(got) == set(want)
    for name in got:
        err = rel_err(got[name], want[name])
        assert err < 2**-5, f"{name}: rel err {err:.3g} against the library's CPU reference"


def test_swiglu_only_arguments_are_typed_errors():
    case = build(13, world=1, tokens=(3,))
    args = (case["xs"][0], case["ids"][0], case["gates"][0], case["gu"], case["dn"])
    with pytest.raises(mxmoe.MxmoeError, match="gpt_oss"):
        md.ep_moe_block(*args, alpha=1.0)
    with pytest.raises(mxmoe.MxmoeError, match="activation"):
        md.ep_moe_block(*args, activation="gelu")
    with pytest.raises(mxmoe.MxmoeError, match="gates"):
        md.ep_moe_block(case["xs"][0], case["ids"][0], case["gates"][0][:, :1], case["gu"], case["dn"])


CPU_CASES = ["swiglu", "gpt_oss", "uneven", "empty_rank", "dropped", "gpt_oss_uneven_dropped",
             "swiglu_dense_limit"]


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_match_the_single_process_block(world, tmp_path):
    """fp32, eager local compute: y, dx, d_gates and each rank's LoRA gradients against the
    single-process block (the same eager code over all experts; only the order of fp32 sums
    differs), for every case of ``_cases`` and the E % W error."""
    spawn(world, "gloo", tmp_path, CPU_CASES, tol=2e-5)


# ---------------------------------------------------------------------------------------------
# GPU tests (NCCL; at least 2 devices).


@multi_gpu
@pytest.mark.parametrize("world", [2, 4])
def test_nccl_ranks_match_the_single_gpu_block(world, tmp_path):
    """bf16 on CUDA: every rank's y, dx, d_gates and LoRA gradients against mxmoe's single-GPU
    ``moe_block`` with all experts on the same inputs (each rank computes the reference on its own
    device), within bf16 rounding (2^-6 of the largest value)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, {torch.cuda.device_count()} visible")
    spawn(world, "nccl", tmp_path, CPU_CASES, tol=2**-6)


def test_from_gpt_oss_keeps_this_ranks_slice_and_matches_the_experts(monkeypatch):
    """``from_gpt_oss``: on one rank the block equals ``MxGptOssExperts`` with the same LoRA (PEFT
    layout there, expert-major here), exactly; on rank 1 of 2 (group size patched) it holds the
    bytes and biases of experts E/2..E."""
    if not _have_transformers():
        pytest.skip("mxmoe.gpt_oss needs transformers 5.x")
    import mxmoe.gpt_oss as mg

    gen = torch.Generator().manual_seed(14)
    e, h, i, r, t = 8, 64, 32, 2, 7
    experts = mg.MxGptOssExperts(e, h, i, dtype=f32)
    with torch.no_grad():
        experts.gate_up_proj_blocks.copy_(torch.randint(0, 256, experts.gate_up_proj_blocks.shape, generator=gen))
        experts.gate_up_proj_scales.copy_(torch.randint(118, 124, experts.gate_up_proj_scales.shape, generator=gen))
        experts.down_proj_blocks.copy_(torch.randint(0, 256, experts.down_proj_blocks.shape, generator=gen))
        experts.down_proj_scales.copy_(torch.randint(118, 124, experts.down_proj_scales.shape, generator=gen))
        experts.gate_up_proj_bias.copy_(torch.randn(e, 2 * i, generator=gen))
        experts.down_proj_bias.copy_(torch.randn(e, h, generator=gen))
    m = md.ExpertParallelMoe.from_gpt_oss(experts, rank=r, lora_alpha=4.0)
    with torch.no_grad():
        for p in (m.gate_up_lora_A, m.gate_up_lora_B, m.down_lora_A, m.down_lora_B):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn((t, h), generator=gen)
    ids = torch.rand((t, e), generator=gen).topk(2, dim=-1).indices
    gates = torch.rand((t, 2), generator=gen)
    peft_b = lambda b: mg.mxmoe_lora_b_to_peft(b, e)  # noqa: E731
    want = experts(x, ids, gates, gate_up_lora=[(m.gate_up_lora_A, peft_b(m.gate_up_lora_B), 2.0)],
                   down_lora=[(m.down_lora_A, peft_b(m.down_lora_B), 2.0)])
    assert torch.equal(m(x, ids, gates), want)

    monkeypatch.setattr(md, "group_info", lambda group=None: (2, 1))
    half = md.ExpertParallelMoe.from_gpt_oss(experts, rank=r)
    assert (half.expert_start, half.expert_stop, half.num_local_experts) == (4, 8, 4)
    assert torch.equal(half.gate_up_packed, mg.blocks_to_packed(experts.gate_up_proj_blocks)[4:])
    assert torch.equal(half.down_scales, experts.down_proj_scales[4:])
    assert torch.equal(half.down_bias, experts.down_proj_bias[4:])
    assert tuple(half.gate_up_lora_A.shape) == (4 * r, h) and tuple(half.down_lora_B.shape) == (h, 4 * r)


def test_nan_scales_are_refused_once_per_buffer_version():
    m = md.ExpertParallelMoe(8, 64, 32, rank=2, dtype=f32)
    x, ids, gates = torch.randn(3, 64), torch.tensor([[0, 1], [2, -1], [7, 1]]), torch.rand(3, 2)
    m(x, ids, gates)
    with torch.no_grad():
        m.down_scales[1, 5, 0] = 255
    with pytest.raises(mxmoe.MxmoeError, match="down scales: scale byte 255"):
        m(x, ids, gates)
    m.allow_nan_scales = True
    assert torch.isnan(m(x, ids, gates)).any()  # expert 1's block is NaN, as torchao keeps it
