"""LoRA fine-tuning of gpt-oss's MoE layers with the experts spread over several GPUs (expert
parallelism, ``mxmoe.distributed``), under torchrun:

    torchrun --standalone --nproc-per-node 4 examples/gpt_oss/train_lora_ep.py \\
        --model /models/gpt-oss-120b --data train.jsonl --out adapter-ep/

Every rank loads the checkpoint with its experts kept in MXFP4 (``mxmoe.gpt_oss.from_pretrained``
onto its own GPU: gpt-oss-120b is ~65 GB that way, so an 80 GB card holds it once), then replaces
each layer's experts by an ``ExpertParallelMoe`` that keeps only that rank's E/W experts (their
MXFP4 bytes, biases and a fresh LoRA) and frees the rest. The attention, router, embeddings and
head stay replicated and frozen; only the expert LoRA trains (``--expert-layers`` picks the layers;
the others get no LoRA). Every rank reads its own share of ``--data`` (every W-th batch); the
experts see the tokens of all ranks through the all-to-all, so their LoRA gradients are complete
on their owner and need no all-reduce. Each rank's loss is divided by W, so the gradients are
those of the mean of the ranks' losses (the DDP convention). Gradient clipping uses the global
norm (one all-reduce).

At the end the LoRA of every layer is gathered on rank 0 and saved as a stock PEFT adapter (expert
LoRA as ``target_parameters``, PEFT's keys and rank-major B), which ``mxmoe.gpt_oss.load_adapter``
or stock transformers + PEFT load on a single-GPU model.

``--tiny`` runs the same code on a random tiny gpt-oss (8 experts, written to a temporary folder)
on the CPU with gloo when there is no GPU (``torchrun --standalone --nproc-per-node 2
examples/gpt_oss/train_lora_ep.py --tiny``), and then checks on rank 0 that the saved adapter,
loaded into a single-process model, gives the logits of the expert-parallel model.

What was run: the ``--tiny`` mode on the CPU (gloo, 2 and 4 ranks). The GPU path (NCCL, the
fused kernels, real checkpoints) has not been run yet; see docs/DISTRIBUTED.md.
"""

import argparse
import itertools
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import mxmoe.gpt_oss as mg
from mxmoe.distributed import ExpertParallelMoe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_lora import batches, write_folder_atomically, write_tiny_checkpoint  # noqa: E402  (the single-GPU example's helpers)

GATE_UP, DOWN = "gate_up_proj", "down_proj"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="openai/gpt-oss-120b", help="checkpoint folder (or Hub id)")
    p.add_argument("--data", help="JSON lines with a 'text' (or 'messages') field")
    p.add_argument("--out", default="gpt-oss-mxmoe-lora-ep", help="where rank 0 saves the adapter")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch and rank")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--expert-layers", default="all",
                   help="'all', or comma-separated layer indices whose experts get LoRA (cookbook: 7,15,23)")
    p.add_argument("--strategy", default="auto",
                   help="moe_block strategy of the local experts ('fused' avoids the routing read-back)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--tiny", action="store_true", help="random tiny model, toy tokens (smoke test)")
    return p.parse_args()


def setup():
    """(device, world, rank) from torchrun's environment: NCCL with one GPU per rank, else gloo."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, dist.get_world_size(), dist.get_rank()


def say(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def expert_parallel(model, args, layers_with_lora, device):
    """Replaces every layer's ``MxGptOssExperts`` by an ``ExpertParallelMoe`` with this rank's
    experts; returns {layer index: module}."""
    out = {}
    for idx, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        r = args.r if idx in layers_with_lora else 0
        ep = ExpertParallelMoe.from_gpt_oss(experts, rank=r, lora_alpha=args.alpha, device=device,
                                            strategy=args.strategy)
        layer.mlp.experts = ep
        out[idx] = ep
        del experts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def gather_lora(ep):
    """The full expert-major LoRA of one layer, gathered from every rank (on every rank):
    {proj: (A [E*r, in], B [out, E*r])}. A's experts are rows, B's columns."""
    world = dist.get_world_size()
    full = {}
    for proj, a, b in ((GATE_UP, ep.gate_up_lora_A, ep.gate_up_lora_B), (DOWN, ep.down_lora_A, ep.down_lora_B)):
        parts = []
        for t in (a, b):
            buf = [torch.empty_like(t, dtype=torch.float32) for _ in range(world)]
            dist.all_gather(buf, t.detach().float().contiguous())
            parts.append(buf)
        full[proj] = (torch.cat(parts[0], dim=0).to(a.dtype), torch.cat(parts[1], dim=1).to(b.dtype))
    return full


def save_adapter(eps, args, out):
    """Rank 0 writes a stock PEFT adapter: ``adapter_model.safetensors`` under PEFT's keys for
    nested expert ``target_parameters`` (gate_up the inner ``base_layer``, down the outer) with
    B rank-major, and the stock ``adapter_config.json``. Every rank takes part (the gather)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for idx, ep in eps.items():
        if ep.rank == 0:
            continue
        full = gather_lora(ep)
        pre = f"base_model.model.model.layers.{idx}.mlp.experts."
        for proj, key in ((GATE_UP, pre + "base_layer."), (DOWN, pre)):
            a, b = full[proj]
            tensors[key + "lora_A.weight"] = a.cpu().contiguous()
            tensors[key + "lora_B.weight"] = mg.mxmoe_lora_b_to_peft(b, ep.num_experts).cpu().contiguous()
    if dist.get_rank() != 0:
        return
    layers = sorted(i for i, ep in eps.items() if ep.rank > 0)
    targets = ([f"mlp.experts.{p}" for p in (GATE_UP, DOWN)] if len(layers) == len(eps) else
               [f"{i}.mlp.experts.{p}" for i in layers for p in (GATE_UP, DOWN)])
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=[], target_parameters=targets,
                        task_type="CAUSAL_LM")
    config.base_model_name_or_path = args.model

    def fill(folder):
        config.save_pretrained(folder)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})

    write_folder_atomically(out, fill)


def global_clip(params, max_norm):
    """Clips the gradients of ``params`` (this rank's) to a global norm over all ranks."""
    local = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is not None:
            local += p.grad.float().pow(2).sum()
    dist.all_reduce(local)
    norm = local.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm.item()


def check_tiny_adapter(model, path, out, device):
    """Rank 0: the saved adapter in a single-process model (``mg.load_adapter``) gives the logits of
    the expert-parallel model (which every rank runs, in step, on the same input)."""
    ids = (torch.arange(32) * 37 % model.config.vocab_size).unsqueeze(0).to(device)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    if dist.get_rank() != 0:
        return
    single = mg.load_adapter(mg.from_pretrained(path, device="cpu", attn_implementation="eager"), out)
    with torch.no_grad():
        got = single(input_ids=ids.cpu()).logits.float()
    err = ((got - want.cpu()).abs().max() / want.abs().max()).item()
    print(f"adapter check: single-process model with the saved adapter vs expert-parallel logits: rel err {err:.2e}")
    if not err < 2e-2:
        raise SystemExit("the saved adapter does not reproduce the expert-parallel model")


def main():
    args = parse_args()
    device, world, rank = setup()
    # The same seed on every rank: the tiny model (written by rank 0) and the LoRA A
    # initialisation are the same run to run, so the --tiny check is reproducible (a random model
    # can put a token's router scores within bf16 rounding of a tie, and the two models may then
    # pick different experts for it).
    torch.manual_seed(0)
    path, tokenizer = args.model, None
    if args.tiny:
        box = [tempfile.mkdtemp(prefix="gpt-oss-tiny-") if rank == 0 else None]
        if rank == 0:
            write_tiny_checkpoint(box[0])
        dist.broadcast_object_list(box, src=0)
        path = box[0]
        args.seq_len = min(args.seq_len, 64)
        args.model = path
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

    t0 = time.time()
    # 1. The whole model on this rank's device (experts MXFP4, the rest bf16), then only this
    #    rank's experts kept.
    model = mg.from_pretrained(path, device=device, attn_implementation="eager", strategy=args.strategy)
    model.config.use_cache = False
    n_layers = len(model.model.layers)
    layers = (set(range(n_layers)) if args.expert_layers == "all" else
              {int(x) for x in args.expert_layers.split(",")})
    model.requires_grad_(False)
    eps = expert_parallel(model, args, layers, device)
    params = [p for ep in eps.values() for p in ep.parameters()]
    for p in params:
        p.requires_grad_(True)
    mem = f", {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB in use" if device.type == "cuda" else ""
    say(f"loaded {path} in {time.time() - t0:.1f} s; {world} ranks, {eps[0].num_local_experts} of "
        f"{eps[0].num_experts} experts per rank{mem}; {sum(p.numel() for p in params)} LoRA parameters on rank 0")

    # 2. Gradient checkpointing: the expert block (and its all-to-alls) runs again in backward, on
    #    every rank in the same layer order.
    if not args.no_grad_ckpt:
        mg.enable_gradient_checkpointing(model)
    model.train()

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    data = itertools.islice(batches(args, tokenizer, model.config.vocab_size), rank, None, world)
    for step in range(args.steps):
        t = time.time()
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for _ in range(args.accum):
            item = next(data)
            ids, labels = item if isinstance(item, tuple) else (item, item)
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss / (args.accum * world)
            loss.backward()
            total += loss.detach().float()
        norm = global_clip(params, 1.0)
        opt.step()
        dist.all_reduce(total)
        value = total.item()
        mem = (f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (torch)"
               if device.type == "cuda" else "")
        say(f"step {step + 1}/{args.steps}: loss {value:.4f}, grad norm {norm:.3g} ({time.time() - t:.2f} s{mem})")
        if not math.isfinite(value):
            raise SystemExit("non-finite loss")

    # 3. The adapter, gathered on rank 0.
    save_adapter(eps, args, args.out)
    say(f"adapter saved to {args.out}")
    if args.tiny:
        check_tiny_adapter(model, path, args.out, device)
    dist.barrier()
    dist.destroy_process_group()
    if device.type == "cpu":
        # torch 2.15 + gloo: a rank that ran the gpt-oss eager block sometimes aborts in a C++
        # destructor at interpreter exit (after everything here is done); skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
