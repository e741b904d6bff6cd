"""One expert-parallel MoE layer at gpt-oss-120b's shapes (E = 128, k = 4, H = I = 2880), forward
+ backward with LoRA on both expert projections, over 1, 2, 4 or 8 GPUs (``torchrun``, NCCL):
tokens/s, peak device memory per GPU, and the all-to-all share of the step.

Every rank holds its E/W experts as random MXFP4 bytes (scale bytes 118..123, as in
``gpt_oss_layer.py``), random bf16 biases (gpt-oss block) and LoRA (B nonzero), its own ``--tokens``
tokens and a softmax top-k router over random logits (``--route skewed`` biases the logits
towards rank 0's experts, for an uneven load). After ``--warmup`` steps it times ``--iters``
steps with CUDA events around each forward + backward and around every all-to-all (the count
exchange, the dispatch and the return, and the two reverse exchanges of the backward;
``comm_events`` of ``mxmoe.distributed.ep_moe_block``). The all-to-all share is the summed
all-to-all time over the step time, per rank; an all-to-all's time includes waiting for the
slowest rank to reach it (load imbalance shows up there).

Peak memory is the device's used memory (total minus ``torch.cuda.mem_get_info``'s free, polled
every millisecond from a thread) minus what was in use before the layer was built: mxmoe's
buffers come from the CUDA driver, not torch's allocator, so ``max_memory_allocated`` (also
reported) misses them. With one process per GPU, the device's memory is that rank's.

    torchrun --standalone --nproc-per-node 1 python/bench/ep_layer.py --tokens 4096
    torchrun --standalone --nproc-per-node 2 python/bench/ep_layer.py --tokens 4096
    torchrun --standalone --nproc-per-node 4 python/bench/ep_layer.py --tokens 4096
    torchrun --standalone --nproc-per-node 8 python/bench/ep_layer.py --tokens 4096 --json ep-8.json

``--tokens`` is per rank (weak scaling: the layer sees W x tokens). Rank 0 prints one table row per
rank and a summary line, and with ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--inter", type=int, default=2880)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--activation", default="gpt_oss", choices=["gpt_oss", "swiglu"])
    p.add_argument("--strategy", default="auto", help="moe_block strategy of the local experts")
    p.add_argument("--route", default="uniform", choices=["uniform", "skewed"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="rank 0 writes the results here")
    p.add_argument("--cpu", action="store_true",
                   help="smoke test of the script on the CPU (gloo, eager local experts, wall-clock "
                        "times, no all-to-all times or memory); use small shapes")
    return p.parse_args()


class MemoryPoller:
    """The device's used memory (total - free), polled every millisecond; ``peak`` in bytes."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self):
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def main():
    args = parse_args()
    import torch
    import torch.distributed as dist

    from mxmoe import route_topk
    from mxmoe.distributed import ExpertParallelMoe

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    cuda = device.type == "cuda"
    world, rank = dist.get_world_size(), dist.get_rank()
    e, h, i, k, t = args.experts, args.hidden, args.inter, args.top_k, args.tokens
    if e % world:
        raise SystemExit(f"E = {e} is not divisible by the world size {world}")

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    base_used = 0
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        base_used = total - free
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    with (MemoryPoller(torch, device) if cuda else contextlib.nullcontext()) as mem:
        m = ExpertParallelMoe(e, h, i, args.rank, 2.0 * args.rank, activation=args.activation,
                              strategy=args.strategy, device=device)
        with torch.no_grad():
            for name in ("gate_up", "down"):
                packed = getattr(m, name + "_packed")
                packed.copy_(torch.randint(0, 256, packed.shape, generator=gen, device=device, dtype=torch.uint8))
                scales = getattr(m, name + "_scales")
                scales.copy_(torch.randint(118, 124, scales.shape, generator=gen, device=device, dtype=torch.uint8))
            if args.activation == "gpt_oss":
                m.gate_up_bias.normal_(0.0, 0.5, generator=gen)
                m.down_bias.normal_(0.0, 0.5, generator=gen)
            m.gate_up_lora_B.normal_(0.0, 0.02, generator=gen)
            m.down_lora_B.normal_(0.0, 0.02, generator=gen)
        x = torch.randn((t, h), generator=gen, device=device, dtype=torch.bfloat16).requires_grad_(True)
        logits = torch.randn((t, e), generator=gen, device=device)
        if args.route == "skewed":
            logits[:, : e // world] += 2.0  # rank 0's experts get most of the slots
        ids, gates = route_topk(logits, k)
        gates.requires_grad_(True)
        dy = torch.randn((t, h), generator=gen, device=device, dtype=torch.bfloat16)

        def step(events):
            y = m(x, ids, gates, comm_events=events)
            y.backward(dy)
            x.grad = gates.grad = None
            for p in m.parameters():
                p.grad = None

        for _ in range(args.warmup):
            step(None)
        sync()
        dist.barrier()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        steps, comms = [], []
        for _ in range(args.iters):
            events = []
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(events)
                end.record()
                torch.cuda.synchronize()
                steps.append(start.elapsed_time(end))
                comms.append(sum(a.elapsed_time(b) for a, b in events))
            else:
                t0 = time.perf_counter()
                step(events)
                steps.append(1e3 * (time.perf_counter() - t0))
                comms.append(0.0)
        dist.barrier()
    step_ms, comm_ms = statistics.median(steps), statistics.median(comms)
    routed = int(((ids >= 0).sum()).item())  # this rank's routed (token, slot) pairs
    row = dict(
        rank=rank, world=world, tokens=t, step_ms=step_ms, all_to_all_ms=comm_ms,
        all_to_all_share=comm_ms / step_ms if step_ms else 0.0,
        peak_gib=(mem.peak - base_used) / 2**30 if cuda else 0.0,
        torch_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        routed_slots=routed, device=torch.cuda.get_device_name(device) if cuda else "cpu",
    )
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        slowest = max(r["step_ms"] for r in rows)
        summary = dict(
            world=world, experts=e, top_k=k, hidden=h, inter=i, lora_rank=args.rank,
            activation=args.activation, strategy=args.strategy, route=args.route, tokens_per_rank=t,
            step_ms=slowest, tokens_per_s=world * t / (slowest / 1e3),
            all_to_all_share=max(r["all_to_all_share"] for r in rows),
            peak_gib_per_gpu=max(r["peak_gib"] for r in rows), device=rows[0]["device"],
        )
        print(f"{'rank':>4} {'step ms':>9} {'a2a ms':>8} {'a2a %':>6} {'peak GiB':>9} {'torch GiB':>9}")
        for r in rows:
            print(f"{r['rank']:>4} {r['step_ms']:>9.2f} {r['all_to_all_ms']:>8.2f} "
                  f"{100 * r['all_to_all_share']:>5.1f}% {r['peak_gib']:>9.2f} {r['torch_peak_gib']:>9.2f}")
        print(f"W={world}: {summary['tokens_per_s']:.0f} tokens/s (fwd+bwd, {world} x {t} tokens, slowest "
              f"rank {slowest:.2f} ms/step), all-to-all up to {100 * summary['all_to_all_share']:.1f}% of "
              f"the step, peak {summary['peak_gib_per_gpu']:.2f} GiB per GPU ({summary['device']})")
        if args.json:
            from mxmoe import _write_atomic  # the package's temp-file-and-rename writer

            _write_atomic(args.json, json.dumps(dict(summary=summary, ranks=rows), indent=1).encode())
    dist.barrier()
    dist.destroy_process_group()
    if not cuda:
        # torch 2.15 + gloo: a rank that ran the gpt-oss eager block sometimes aborts in a C++
        # destructor at interpreter exit (after the results are out); skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
