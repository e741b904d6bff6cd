"""One real-size gpt-oss expert layer, forward + backward with LoRA on both expert projections:
mxmoe (MXFP4 experts, the fused kernels) against transformers' own ``GptOssExperts`` on the
dequantized bf16 experts with its default ``grouped_mm`` path and PEFT's expert LoRA
(``target_parameters``) — the stock recipe — plus mxmoe's own bf16 path, on the same weights,
routing and LoRA.

Each variant runs in a fresh subprocess (so one allocator's cache cannot hide another's peak):
it builds its weights, warms up, then times ``iters`` forward + backward steps with CUDA events
around each step and reports the median and the peak device memory in use (NVML, polled every
millisecond from a thread, minus what was in use before the variant allocated anything; mxmoe's
buffers come from the CUDA driver, not torch's allocator, so torch's counters would miss them;
the device's used memory is total minus ``torch.cuda.mem_get_info``'s free memory).

    python3 python/bench/gpt_oss_layer.py --model 20b --tokens 4096 --rank 16
    python3 python/bench/gpt_oss_layer.py --model 120b

Prints one table row per variant and a JSON line (``--json``) for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

MODELS = {"20b": 32, "120b": 128}
HIDDEN = INTER = 2880
TOP_K = 4
VARIANTS = ["hf-grouped_mm-bf16+peft", "mxmoe-mxfp4-fused", "mxmoe-mxfp4-auto", "mxmoe-bf16"]


def gpu_dequantize(packed, scales):
    """MXFP4 → bf16 ``[E, N, K]`` on the GPU, one expert at a time (E2M1 codes, even k in the low
    nibble, scale 2^(byte − 127)); the scale bytes here are far from 0 and 255."""
    import torch

    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    lut = torch.tensor(e2m1 + [-v for v in e2m1], device=packed.device)
    e, n, half = packed.shape
    out = torch.empty((e, n, 2 * half), dtype=torch.bfloat16, device=packed.device)
    for x in range(e):
        p = packed[x].to(torch.int64)
        codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(n, 2 * half)
        scale = torch.exp2(scales[x].float() - 127.0).repeat_interleave(32, dim=-1)
        out[x] = (lut[codes] * scale).to(torch.bfloat16)
    return out


def build(variant, experts, tokens, rank, seed):
    """Weights, routing, LoRA and one step function for ``variant`` (all on the GPU)."""
    import torch

    import mxmoe

    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, i, e = HIDDEN, INTER, experts

    def mx(n, k):  # random MXFP4 bytes in mxmoe's (= the checkpoint's) layout
        packed = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=dev, generator=gen)
        scales = torch.randint(118, 124, (e, n, k // 32), dtype=torch.uint8, device=dev, generator=gen)
        return packed, scales

    gu = mx(2 * i, h)  # gate_up_proj [E, 2I, H], rows interleaved (2i gate, 2i + 1 up)
    dn = mx(h, i)  # down_proj [E, H, I]
    b_gu = (torch.randn((e, 2 * i), device=dev, generator=gen) * 0.1).to(bf16)
    b_dn = (torch.randn((e, h), device=dev, generator=gen) * 0.1).to(bf16)
    x0 = torch.randn((tokens, h), device=dev, generator=gen).to(bf16)
    logits = torch.randn((tokens, e), device=dev, generator=gen)
    top, ids = logits.topk(TOP_K, dim=-1)
    gates0 = torch.softmax(top, dim=-1).to(bf16)
    dy = torch.randn((tokens, h), device=dev, generator=gen).to(bf16)
    lora_alpha = 2 * rank
    scaling = lora_alpha / rank

    def lora(k_dim, n):  # PEFT's shapes: A [E*r, in] expert-major, B [out, E*r] (mxmoe: expert-major)
        a = (torch.randn((e * rank, k_dim), device=dev, generator=gen) / k_dim**0.5).to(bf16)
        b = (torch.randn((n, e * rank), device=dev, generator=gen) * 0.01).to(bf16)
        return a, b

    (a1, b1), (a2, b2) = lora(h, 2 * i), lora(i, h)

    if variant.startswith("mxmoe"):
        if variant == "mxmoe-bf16":
            w_gu, w_dn = gpu_dequantize(*gu), gpu_dequantize(*dn)
            del gu, dn
        else:
            w_gu, w_dn = gu, dn
        strategy = {"mxmoe-mxfp4-fused": "fused", "mxmoe-mxfp4-auto": "auto"}.get(variant, "auto")
        leaves = [t.clone().requires_grad_() for t in (a1, b1, a2, b2)]
        x = x0.clone().requires_grad_()
        gates = gates0.clone().requires_grad_()

        def step():
            y = mxmoe.moe_block(
                x, ids, gates, w_gu, w_dn, (leaves[0], leaves[1], scaling), (leaves[2], leaves[3], scaling),
                limit=7.0, strategy=strategy, activation="gpt_oss", alpha=1.702,
                gate_up_bias=b_gu, down_bias=b_dn,
            )
            y.backward(dy)

        return step

    # transformers' GptOssExperts (grouped_mm) on the dequantized bf16 experts + PEFT's expert LoRA.
    import peft
    from torch import nn
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(
        hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=TOP_K,
        num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
    )
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        experts = GptOssExperts(cfg)
    experts.to_empty(device=dev)
    experts.to(bf16)
    with torch.no_grad():
        # transformers holds the transpose of the checkpoint layout: [E, in, out].
        experts.gate_up_proj.copy_(gpu_dequantize(*gu).transpose(1, 2))
        experts.down_proj.copy_(gpu_dequantize(*dn).transpose(1, 2))
        experts.gate_up_proj_bias.copy_(b_gu)
        experts.down_proj_bias.copy_(b_dn)
    del gu, dn
    for p in experts.parameters():
        p.requires_grad_(False)
    holder = nn.ModuleDict({"experts": experts})
    holder = peft.inject_adapter_in_model(
        peft.LoraConfig(r=rank, lora_alpha=lora_alpha,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        holder,
    )
    outer = holder["experts"]
    rank_major = lambda b: b.reshape(b.shape[0], e, rank).permute(0, 2, 1).reshape(b.shape[0], e * rank)
    with torch.no_grad():  # the same LoRA values (PEFT's B is rank-major); gate_up is the inner wrapper
        outer.base_layer.lora_A["default"].weight.copy_(a1)
        outer.base_layer.lora_B["default"].weight.copy_(rank_major(b1))
        outer.lora_A["default"].weight.copy_(a2)
        outer.lora_B["default"].weight.copy_(rank_major(b2))
    holder.to(dev, bf16)  # PEFT would keep the adapters in fp32; the whole layer runs in bf16
    x = x0.clone().requires_grad_()
    gates = gates0.clone().requires_grad_()

    def step():
        y = outer(x, ids, gates)
        y.backward(dy)

    return step


def run_variant(variant, experts, tokens, rank, iters, warmup):
    """Runs in the subprocess: prints one JSON line with the median time and the peak memory."""
    import torch

    torch.cuda.init()

    def used():
        free, total = torch.cuda.mem_get_info()
        return total - free

    base_used = used()
    peak = [base_used]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.001)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    step = build(variant, experts, tokens, rank, seed=0)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    stop.set()
    poller.join()
    print(json.dumps({
        "variant": variant, "experts": experts, "tokens": tokens, "rank": rank, "iters": iters,
        "median_ms": statistics.median(times), "min_ms": min(times),
        "peak_gib": (peak[0] - base_used) / 2**30, "device": torch.cuda.get_device_name(),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="20b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    experts = MODELS[args.model]
    if args.child:
        run_variant(args.child, experts, args.tokens, args.rank, args.iters, args.warmup)
        return
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            ap.error(f"unknown variant {variant!r}; expected some of {VARIANTS}")
        cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
               "--rank", str(args.rank), "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--child", variant]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode != 0 or not line.startswith("{"):
            rows.append({"variant": variant, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(line))
    print(f"gpt-oss-{args.model} experts layer: E={experts}, H=I={HIDDEN}, top-{TOP_K}, T={args.tokens}, "
          f"LoRA r={args.rank} on both projections, forward + backward")
    print(f"{'variant':28s} {'median ms':>10s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:28s} error: {r['error']}")
        else:
            print(f"{r['variant']:28s} {r['median_ms']:10.2f} {r['peak_gib']:9.2f}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
