"""Overhead of the Python boundary: one MXFP4 expert projection forward + backward through
``mxmoe.expert_linear`` (torch tensors, autograd) at SPEC §8's dense shape, timed with CUDA events
like ``mxmoe bench``, so the two medians can be compared on the same card.

    PYTHONPATH=<site with the wheel> python3 python/bench/boundary.py [--strategy fused] [--iters 30]

(from a folder of its own, so the source package in python/ does not shadow the installed wheel)
"""

import argparse

import torch

import mxmoe


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="fused", choices=["fused", "selective", "auto", "bf16"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args()
    torch.manual_seed(0)
    E, K, N, T, top_k, r, s = 128, 2048, 1024, 4096, 8, 16, 0.5
    dev = "cuda"
    w = torch.randn(E, N, K, device=dev) / K**0.5
    weights = w.to(torch.bfloat16) if a.strategy == "bf16" else mxmoe.quantize(w)
    strategy = "fused" if a.strategy == "bf16" else a.strategy
    lora_A = (0.01 * torch.randn(E * r, K, device=dev)).to(torch.bfloat16).requires_grad_()
    lora_B = (0.01 * torch.randn(N, E * r, device=dev)).to(torch.bfloat16).requires_grad_()
    x = torch.randn(T, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randn(T, E, device=dev).softmax(-1).topk(top_k, dim=-1).indices
    dy = torch.randn(T * top_k, N, device=dev, dtype=torch.bfloat16)

    def step():
        x.grad = lora_A.grad = lora_B.grad = None
        y = mxmoe.expert_linear(x, ids, weights, lora_A, lora_B, s, None, "scattered", "scattered", strategy)
        y.backward(dy)

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    print(f"python boundary, {a.strategy}: median {times[len(times) // 2]:.3f} ms "
          f"(min {times[0]:.3f}, max {times[-1]:.3f}) over {a.iters} fwd+bwd on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
