"""Generates nvfp4_golden_torchao.safetensors: torchao's own NVFP4 quantization of a fixed input,
the golden file mxmoe's NVFP4 quantizer and dequantizer are checked against bit for bit.

    pip install torch torchao==0.18.0 safetensors
    python3 tests/data/golden/gen_nvfp4_golden.py tests/data/golden/nvfp4_golden_torchao.safetensors

Runs on the CPU. The input is [E, N, K] = [3, 16, 128] bf16 with every kind of block: ordinary
normal values, a block of zeros, blocks with tiny and huge magnitudes (E4M3 scale clamped at
2^-6 and at 448), values at the E2M1 rounding ties, negative zeros, and experts of different
ranges. Quantized twice with torchao's ``NVFP4Tensor.to_nvfp4`` per expert ([N, K] at a time):
without a per-tensor scale (single-level: E4M3 block scales only) and with the per-tensor scale
``per_tensor_amax_to_scale(amax(|W_e|))`` of each expert (two-level), as ModelOpt exports.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

import torchao

E, N, K = 3, 16, 128


def golden_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(20261205)
    x = torch.randn((E, N, K), generator=g)
    x[1] *= 40.0  # a second range
    x[2] *= 1e-3  # a third
    x[0, 0, :16] = 0.0  # an all-zero block
    x[0, 1, :16] = torch.randn(16, generator=g) * 1e-6  # block scale below 2^-6 (clamped)
    x[0, 2, :16] = torch.randn(16, generator=g) * 1e4  # block scale above 448 (clamped)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0, -6.0])
    x[0, 3, :16] = ties  # amax 6: block scale 1, the values sit on E2M1 rounding ties
    x[0, 4, :16] = -0.0
    x[0, 4, 3] = 1.0
    return x.to(torch.bfloat16)


def main(out: str) -> None:
    x = golden_input()
    tensors = {"input_bf16": x.contiguous()}
    packed1, scales1, packed2, scales2, tensor_scales = [], [], [], [], []
    for e in range(E):
        t = NVFP4Tensor.to_nvfp4(x[e].contiguous())
        packed1.append(t.qdata.view(torch.uint8))
        scales1.append(t.scale.view(torch.uint8))
        ts = per_tensor_amax_to_scale(x[e].float().abs().amax())
        t2 = NVFP4Tensor.to_nvfp4(x[e].contiguous(), per_tensor_scale=ts)
        packed2.append(t2.qdata.view(torch.uint8))
        scales2.append(t2.scale.view(torch.uint8))
        tensor_scales.append(ts.reshape(1).float())
        # The dequantized values torchao gives (f32 and bf16), for the dequantizer's test.
        tensors[f"dequant_f32_single_{e}"] = t.dequantize(torch.float32).contiguous()
        tensors[f"dequant_bf16_single_{e}"] = t.dequantize(torch.bfloat16).contiguous()
        tensors[f"dequant_f32_two_level_{e}"] = t2.dequantize(torch.float32).contiguous()
        tensors[f"dequant_bf16_two_level_{e}"] = t2.dequantize(torch.bfloat16).contiguous()
    tensors["single_packed"] = torch.stack(packed1).contiguous()
    tensors["single_scales"] = torch.stack(scales1).contiguous()
    tensors["two_level_packed"] = torch.stack(packed2).contiguous()
    tensors["two_level_scales"] = torch.stack(scales2).contiguous()
    tensors["two_level_tensor_scales"] = torch.cat(tensor_scales).contiguous()
    # Written beside `out` and renamed over it, so a failure leaves an existing golden file intact.
    tmp = out + ".tmp"
    save_file(tensors, tmp, metadata={
        "generator": "tests/data/golden/gen_nvfp4_golden.py",
        "torchao": torchao.__version__,
        "torch": torch.__version__,
        "shape": f"[{E}, {N}, {K}]",
    })
    os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nvfp4_golden_torchao.safetensors")
