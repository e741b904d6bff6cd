"""Fine-tune gpt-oss with LoRA on MXFP4-resident experts (mxmoe + transformers 5.x + PEFT).

    python examples/gpt_oss/train_lora.py --model openai/gpt-oss-20b --data train.jsonl --out adapter/

loads the checkpoint with its experts kept in MXFP4 (``mxmoe.gpt_oss.from_pretrained``), adds LoRA
to the attention projections and to the experts (the stock PEFT config of the OpenAI cookbook),
trains a few steps with gradient checkpointing, and saves a PEFT adapter that stock transformers +
PEFT load on the dequantized bf16 model. ``--data`` is a JSON-lines file with a ``"text"`` field
per line (or ``"messages"`` for the chat template). ``--tiny`` runs the same code on a random tiny
gpt-oss written to a temporary folder (no download, CPU is fine) as a smoke test.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import torch
from peft import LoraConfig

import mxmoe.gpt_oss as mg


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="openai/gpt-oss-20b", help="checkpoint folder or Hub id")
    p.add_argument("--data", help="JSON lines with a 'text' (or 'messages') field")
    p.add_argument("--out", default="gpt-oss-mxmoe-lora", help="where the adapter is saved")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--expert-layers", default="all",
                   help="'all', or comma-separated layer indices whose experts get LoRA (cookbook: 7,15,23)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help="random tiny model, random tokens (smoke test)")
    return p.parse_args()


def write_tiny_checkpoint(folder):
    """A random tiny gpt-oss checkpoint in the real layout (MXFP4 experts as *_blocks/*_scales)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(hidden_size=64, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       vocab_size=256, max_position_embeddings=256, sliding_window=8,
                       rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if ".experts." not in k}
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 20  # a frozen random head barely moves the logits
    e, h, i = 8, 64, 96
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}.mlp.experts."
        for proj, (n, k) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
            tensors[pre + proj + "_blocks"] = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8)
            tensors[pre + proj + "_scales"] = torch.randint(118, 124, (e, n, k // 32), dtype=torch.uint8)
            tensors[pre + proj + "_bias"] = (torch.randn(e, n) * 0.5).to(torch.bfloat16)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    conf = cfg.to_dict()
    conf["quantization_config"] = {"quant_method": "mxfp4"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conf, f)


def write_folder_atomically(out, fill):
    """``fill(folder)`` into a fresh folder beside ``out``, then swapped in: a failed or
    interrupted save leaves an earlier folder at ``out`` as it was."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".saving-", dir=parent)
    try:
        fill(staging)
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        os.rename(staging, out)
        staging = None
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def save_adapter_atomically(model, out):
    """``model.save_pretrained(out)`` through :func:`write_folder_atomically`."""
    write_folder_atomically(out, model.save_pretrained)


def batches(args, tokenizer, vocab_size):
    """Yields [batch, seq_len] token ids forever."""
    if args.tiny or not args.data:
        if not args.tiny:
            print("no --data given: training on a repeated toy sequence")
        seq = (torch.arange(min(args.seq_len, 64)) * 37) % vocab_size
        while True:
            yield seq.repeat(args.batch, 1)
    rows = []
    with open(args.data) as f:
        for line in f:
            item = json.loads(line)
            if "messages" in item:
                text = tokenizer.apply_chat_template(item["messages"], tokenize=False)
            else:
                text = item["text"]
            rows.append(tokenizer(text, truncation=True, max_length=args.seq_len)["input_ids"])
    if not rows:
        raise SystemExit(f"{args.data}: no rows")
    step = 0
    while True:
        chunk = [rows[(step * args.batch + j) % len(rows)] for j in range(args.batch)]
        step += 1
        width = max(len(r) for r in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            labels[j, : len(r)] = torch.tensor(r)
        yield ids, labels


def main():
    args = parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, tokenizer = args.model, None
    if args.tiny:
        path = tempfile.mkdtemp(prefix="gpt-oss-tiny-")
        write_tiny_checkpoint(path)
        args.seq_len = min(args.seq_len, 64)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

    t0 = time.time()
    # 1. The model: experts stay MXFP4 (≈13.8 GB for 20b, ≈65 GB for 120b), the rest bf16.
    model = mg.from_pretrained(path, device=device, attn_implementation="eager")
    model.config.use_cache = False
    print(f"loaded {path} in {time.time() - t0:.1f} s")

    # 2. The stock PEFT config (attention + experts); mxmoe.gpt_oss.get_peft_model puts the expert
    #    LoRA into MxLoraExperts, saved in PEFT's own keys and shapes.
    prefix = "" if args.expert_layers == "all" else None
    layers = [] if prefix is not None else [int(x) for x in args.expert_layers.split(",")]
    expert_targets = (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if prefix is not None else
                      [f"{n}.mlp.experts.{p}" for n in layers for p in ("gate_up_proj", "down_proj")])
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear",
                        target_parameters=expert_targets, task_type="CAUSAL_LM")
    model = mg.get_peft_model(model, config)
    model.print_trainable_parameters()

    # 3. Gradient checkpointing (the expert block runs again in backward).
    mg.enable_gradient_checkpointing(model)  # activation_checkpointing_enable (5.25) or gradient_checkpointing_enable
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    data = batches(args, tokenizer, model.config.vocab_size)
    for step in range(args.steps):
        t = time.time()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.accum):
            item = next(data)
            ids, labels = item if isinstance(item, tuple) else (item, item)
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss / args.accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
        print(f"step {step + 1}/{args.steps}: loss {total:.4f} ({time.time() - t:.2f} s{mem})")
        if not math.isfinite(total):
            raise SystemExit("non-finite loss")

    # 4. A stock PEFT adapter: loads with PeftModel.from_pretrained on the dequantized bf16 model,
    #    or with mxmoe.gpt_oss.load_adapter on the MXFP4 one.
    save_adapter_atomically(model, args.out)
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
