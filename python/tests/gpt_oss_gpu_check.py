"""GPU diagnostics for mxmoe.gpt_oss (prints tables; not a pytest module).

    PYTHONPATH=<mxmoe site>:<transformers+peft site> python3 python/tests/gpt_oss_gpu_check.py

1. Two expert-block calls in one graph (forward A, forward B, one backward) against the same
   calls run one at a time: a saved forward state clobbered by a later call shows here.
2. The layer-0 expert block of the tiny model on its captured inputs, CUDA (each strategy, with
   and without LoRA) against the CPU fallback in fp32.
3. The end-to-end tiny model: per-parameter gradient error of mxmoe (bf16) and of transformers'
   bf16 eager, both against transformers' fp32 eager with stock PEFT.
"""

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import test_gpt_oss as t  # noqa: E402
from test_gpt_oss import bf16, f32, mg, rel  # noqa: E402


def two_calls():
    case = t.build_parity_case(*t.CASES["base"], tokens=64)
    dev = "cuda"
    ex = mg.MxGptOssExperts.from_config(case["cfg"], dtype=bf16, device=dev)
    with torch.no_grad():
        for proj, (packed, scales) in case["bytes"].items():
            getattr(ex, proj + "_blocks").copy_(mg.packed_to_blocks(packed))
            getattr(ex, proj + "_scales").copy_(scales)
        ex.gate_up_proj_bias.copy_(case["bias"][0])
        ex.down_proj_bias.copy_(case["bias"][1])
    x = case["x"].to(dev, bf16)
    idx, w = case["idx"].to(dev), case["w"].to(dev, bf16)
    x2 = (x.flip(0) * 0.5).contiguous()

    def run(together):
        a = t.leaf(x, dev, bf16)
        b = t.leaf(x2, dev, bf16)
        if together:
            ya = ex(a, idx, w)
            yb = ex(b, idx.flip(0).contiguous(), w.flip(0).contiguous())
            (ya.float().square().sum() + yb.float().sum()).backward()
        else:
            ex(a, idx, w).float().square().sum().backward()
            ex(b, idx.flip(0).contiguous(), w.flip(0).contiguous()).float().sum().backward()
        return a.grad, b.grad

    ga, gb = run(True)
    sa, sb = run(False)
    print(f"two calls in one graph vs one at a time: dx_a rel {rel(ga, sa):.2e}, dx_b rel {rel(gb, sb):.2e}")


def end_to_end():
    model = t.tiny_model(router_scale=8.0)
    cfg = t.lora_config()
    ref, mx = t.stock_and_mxmoe(model, cfg, device="cuda")  # one call: the same LoRA weights
    floor_model = copy.deepcopy(ref).to(bf16)
    mx.to(bf16)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2)).cuda()
    l_ref, g_ref = t.loss_and_grads(ref, ids)
    l_fl, g_fl = t.loss_and_grads(floor_model, ids)
    l_mx, g_mx = t.loss_and_grads(mx, ids)
    print(f"loss: fp32 {l_ref.item():.5f}, bf16 eager {l_fl.item():.5f}, mxmoe {l_mx.item():.5f}")
    with torch.no_grad():
        lr, lf, lm = (m(ids).logits.float() for m in (ref, floor_model, mx))
    print(f"logits rel: bf16 eager {rel(lf, lr):.3e}, mxmoe {rel(lm, lr):.3e}")
    for k in sorted(g_ref):
        print(f"{k[len('base_model.model.'):]:70s} mxmoe {rel(g_mx[k], g_ref[k]):.3e}  bf16 eager {rel(g_fl[k], g_ref[k]):.3e}")




def layer_inputs():
    """The layer-0 expert block of the tiny model on its captured inputs: CUDA kernel vs CPU fallback."""
    model = t.tiny_model(router_scale=8.0)
    _, mx = t.stock_and_mxmoe(model, t.lora_config(), dtype=bf16, device="cuda")
    seen = {}
    layer = mx.base_model.model.model.layers[0].mlp.experts
    layer.register_forward_hook(lambda m, args, out: seen.update(args=[a.detach() for a in args], out=out.detach()))
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        mx(ids)
    x, idx, w = seen["args"]
    print("rows per expert:", torch.bincount(idx.reshape(-1), minlength=8).tolist(), "x", tuple(x.shape), x.dtype, w.dtype)
    cpu_layer = copy.deepcopy(layer).to("cpu", f32)
    with torch.no_grad():
        want = cpu_layer(x.cpu().float(), idx.cpu(), w.cpu().float())
        for strategy in ("auto", "fused", "selective"):
            layer.experts().strategy = strategy
            got = layer(x, idx, w).float().cpu()
            print(f"strategy {strategy}: rel {rel(got, want):.3e}")
        with mx.disable_adapter():
            layer.experts().strategy = "auto"
            got = layer(x, idx, w).float().cpu()
            want0 = cpu_layer.experts()(x.cpu().float(), idx.cpu(), w.cpu().float())
        print(f"no LoRA: rel {rel(got, want0):.3e}")
        sub = slice(0, 48)
        got = layer(x[sub].contiguous(), idx[sub].contiguous(), w[sub].contiguous()).float().cpu()
        print(f"first 48 tokens: rel {rel(got, cpu_layer(x[sub].cpu().float(), idx[sub].cpu(), w[sub].cpu().float())):.3e}")


if __name__ == "__main__":
    if not t.HAVE_GPU:
        raise SystemExit("needs a CUDA device and the driver")
    two_calls()
    layer_inputs()
    end_to_end()
