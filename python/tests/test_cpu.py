"""CPU tests: import, the quantizer/dequantizer against torchao's golden file, clear errors,
``run_file`` on the CPU reference.

Need neither torch nor a GPU.
"""

import os
import pathlib

import pytest

import mxmoe

GOLDEN = pathlib.Path(
    os.environ.get(
        "MXMOE_GOLDEN",
        pathlib.Path(__file__).resolve().parents[2]
        / "tests/data/golden/mxfp4_golden_torchao.safetensors",
    )
)


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden file not found at {GOLDEN} (set MXMOE_GOLDEN)")
    return mxmoe.read_safetensors(GOLDEN)


def test_import_exposes_the_api():
    assert mxmoe.__version__
    assert isinstance(mxmoe.driver_present(), bool)
    assert issubclass(mxmoe.NoDeviceError, mxmoe.MxmoeError)
    assert issubclass(mxmoe.MxmoeError, RuntimeError)
    for name in ("quantize_mxfp4_bytes", "dequantize_mxfp4_bytes", "read_safetensors", "run_file"):
        assert callable(getattr(mxmoe, name))


def test_golden_file_reads_with_mxmoe_reader(golden):
    assert golden["input_bf16"][:2] == ("BF16", [4, 64, 256])
    assert golden["packed"][:2] == ("U8", [4, 64, 128])
    assert golden["scales"][:2] == ("U8", [4, 64, 8])
    assert golden["dequantized_bf16"][:2] == ("BF16", [4, 64, 256])


def test_quantize_matches_torchao_bit_for_bit(golden):
    _, (e, n, k), data = golden["input_bf16"]
    packed, scales = mxmoe.quantize_mxfp4_bytes(data, e, n, k, dtype="bf16")
    assert packed == golden["packed"][2]
    assert scales == golden["scales"][2]


def test_quantize_f32_of_bf16_values_matches_too(golden):
    import struct

    _, (e, n, k), data = golden["input_bf16"]
    bits = struct.unpack(f"<{len(data) // 2}H", data)
    f32 = struct.pack(f"<{len(bits)}I", *(b << 16 for b in bits))
    packed, scales = mxmoe.quantize_mxfp4_bytes(f32, e, n, k, dtype="f32")
    assert packed == golden["packed"][2]
    assert scales == golden["scales"][2]


def test_dequantize_matches_torchao_bit_for_bit(golden):
    _, (e, n, half), packed = golden["packed"]
    scales = golden["scales"][2]
    out = mxmoe.dequantize_mxfp4_bytes(packed, scales, e, n, 2 * half)
    assert out == golden["dequantized_bf16"][2]


def test_round_trip_is_idempotent(golden):
    # quantize(dequantize(q)) == q for torchao's own codes (every scale is finite here).
    _, (e, n, half), packed = golden["packed"]
    scales = golden["scales"][2]
    deq = mxmoe.dequantize_mxfp4_bytes(packed, scales, e, n, 2 * half)
    if 255 in scales:
        pytest.skip("NaN scales do not round-trip")
    p2, s2 = mxmoe.quantize_mxfp4_bytes(deq, e, n, 2 * half, dtype="bf16")
    deq2 = mxmoe.dequantize_mxfp4_bytes(p2, s2, e, n, 2 * half)
    assert deq2 == deq


def test_errors_carry_the_library_message():
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.quantize_mxfp4_bytes(b"\0" * 4 * 48, 1, 1, 48)
    assert str(err.value) == "K = 48 is not a multiple of the MX block size 32"

    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.quantize_mxfp4_bytes(b"\0" * 4 * 32, 1, 2, 32)
    assert "values" in str(err.value) or "elements" in str(err.value)

    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.quantize_mxfp4_bytes(b"\0" * 3, 1, 1, 32)
    assert str(err.value) == "values: 3 bytes is not a whole number of f32"

    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.quantize_mxfp4_bytes(b"", 1, 1, 32, dtype="f64")
    assert str(err.value) == 'dtype: expected "f32" or "bf16", got "f64"'

    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.dequantize_mxfp4_bytes(b"\0" * 15, b"\0", 1, 1, 32)
    assert str(err.value) == "packed: buffer holds 15 elements, shape needs 16"

    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.read_safetensors(b"not a safetensors file")
    assert str(err.value).startswith("safetensors file") or str(err.value).startswith(
        "truncated safetensors file"
    )


def test_nan_scales_are_rejected_unless_allowed():
    # [E=2, N=3, K=64]: expert 1, row 2, block 1 holds the E8M0 NaN byte.
    e, n, k = 2, 3, 64
    packed = bytes([0x21]) * (e * n * k // 2)
    scales = bytearray([127] * (e * n * k // 32))
    scales[(n + 2) * 2 + 1] = 255
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.dequantize_mxfp4_bytes(packed, bytes(scales), e, n, k)
    msg = str(err.value)
    for needle in ("scale byte 255", "expert 1", "row 2", "block 1"):
        assert needle in msg, msg
    out = mxmoe.dequantize_mxfp4_bytes(packed, bytes(scales), e, n, k, allow_nan_scales=True)
    import struct

    bits = struct.unpack(f"<{e * n * k}H", out)
    start = (n + 2) * k + 32
    assert all(b & 0x7F80 == 0x7F80 and b & 0x7F for b in bits[start : start + 32])
    assert not any(b & 0x7F80 == 0x7F80 for b in bits[:start])


@pytest.mark.skipif(mxmoe.driver_present(), reason="a CUDA driver is present")
def test_no_driver_is_a_clear_error():
    with pytest.raises(mxmoe.NoDeviceError) as err:
        mxmoe.device_count()
    assert str(err.value) == "no CUDA driver found (libcuda could not be loaded)"
    with pytest.raises(mxmoe.NoDeviceError):
        mxmoe._native.Gpu(0, 0)


def test_torch_names_need_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            mxmoe.MxExpertLinear
    else:
        assert mxmoe.MxExpertLinear is not None
    with pytest.raises(AttributeError):
        mxmoe.no_such_name


# ------------------------------------------------------------------------------------------------
# run_file: one call described by a safetensors file (the format of `mxmoe run`), on the CPU
# reference. The input files are written here in pure Python (struct + json), and the results are
# checked against a plain f64 computation of the same formulas.


def _bf16_bits(v):
    """The bf16 bits of `v` (round to nearest even, as the library rounds)."""
    import struct

    b = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _bf16(v):
    """`v` rounded to a bf16 value."""
    import struct

    return struct.unpack("<f", struct.pack("<I", _bf16_bits(v) << 16))[0]


def _values(n, seed, scale=1.0):
    """`n` deterministic bf16 values in [-scale, scale)."""
    out, s = [], seed * 2654435761 % 2**32 | 1
    for _ in range(n):
        s = (s * 1103515245 + 12345) % 2**31
        out.append(_bf16((s / 2**30 - 1.0) * scale))
    return out


def _safetensors(tensors, metadata=None):
    """A safetensors file: `tensors` is {name: (dtype, shape, values)}; values are Python
    numbers for BF16 and I32, or the raw little-endian bytes for any dtype (other test modules
    import this writer)."""
    import json
    import struct

    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, values) in tensors.items():
        if isinstance(values, (bytes, bytearray)):
            blob = bytes(values)
        elif dtype == "BF16":
            blob = struct.pack(f"<{len(values)}H", *(_bf16_bits(v) for v in values))
        else:
            blob = struct.pack(f"<{len(values)}i", *values)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _floats(tensor):
    """The values of a ("BF16", shape, bytes) result."""
    import struct

    dtype, shape, data = tensor
    assert dtype == "BF16"
    bits = struct.unpack(f"<{len(data) // 2}H", data)
    return [struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in bits]


def _assert_close(got, want, what, rel=2**-6):
    """bf16 results against an unrounded f64 computation: a few bf16 ulps of the largest value."""
    assert len(got) == len(want), what
    tol = rel * max(abs(w) for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= tol, f"{what}[{i}]: got {g}, want {w} (tolerance {tol})"


def _matvec(rows, v):
    """[sum_k rows[n][k] * v[k] for n]."""
    return [sum(a * b for a, b in zip(row, v)) for row in rows]


# T = 3 tokens, top-2; token 2's second slot is dropped (-1).
IDS = [0, 1, 1, 0, 0, -1]
T, TOP_K = 3, 2


def test_run_file_projection_on_the_cpu_reference(tmp_path):
    e, n, k = 2, 16, 64
    w = _values(e * n * k, 1, 0.5)
    x = _values(T * k, 2)
    dy = _values(T * TOP_K * n, 3)
    inputs = tmp_path / "in.safetensors"
    inputs.write_bytes(
        _safetensors(
            {
                "w": ("BF16", [e, n, k], w),
                "expert_ids": ("I32", [T, TOP_K], IDS),
                "x": ("BF16", [T, k], x),  # token order
                "dy": ("BF16", [T * TOP_K, n], dy),
                "gate": ("BF16", [T, TOP_K], [0.0] * 6),  # a misspelt `gates`: not read
            },
            {"origin": "pytest"},
        )
    )
    out = tmp_path / "out.safetensors"
    with pytest.warns(UserWarning, match="`gate`"):
        r = mxmoe.run_file(inputs, out, cpu=True)
    assert r.backend == "cpu-reference" and r.device == "cpu" and r.fallback is None
    assert "one expert projection" in r.problem
    assert r.metadata["mxmoe.mode"] == "projection"
    assert r.metadata["mxmoe.backend"] == "cpu-reference"
    assert r.metadata["origin"] == "pytest"
    assert sorted(r.tensors) == ["d_x", "out"]
    assert r.tensors["out"][1] == [T * TOP_K, n]
    assert r.tensors["d_x"][1] == [T, k]
    # The file written is the result.
    assert out.read_bytes() == r.data
    assert mxmoe.read_safetensors(out) == r.tensors

    # out[p] = x[t] W_e^T for slot p = t*k + j (zero for the dropped slot);
    # d_x[t] = sum over t's slots of dy[p] W_e.
    experts = [[w[(ex * n + i) * k : (ex * n + i + 1) * k] for i in range(n)] for ex in range(e)]
    want_out, want_dx = [], [0.0] * (T * k)
    for p, ex in enumerate(IDS):
        t = p // TOP_K
        if ex < 0:
            want_out += [0.0] * n
            continue
        want_out += _matvec(experts[ex], x[t * k : (t + 1) * k])
        for c in range(k):
            want_dx[t * k + c] += sum(dy[p * n + i] * experts[ex][i][c] for i in range(n))
    _assert_close(_floats(r.tensors["out"]), want_out, "out")
    _assert_close(_floats(r.tensors["d_x"]), want_dx, "d_x")
    assert _floats(r.tensors["out"])[5 * n : 6 * n] == [0.0] * n

    # Bytes in work as well, and the same file gives the same bits.
    with pytest.warns(UserWarning):
        again = mxmoe.run_file(inputs.read_bytes(), cpu=True)
    assert again.tensors == r.tensors and again.metadata == r.metadata


def test_run_file_block_on_the_cpu_reference():
    import math

    e, h, i, r_ = 2, 16, 8, 1
    gu = _values(e * 2 * i * h, 11, 0.3)
    dn = _values(e * h * i, 12, 0.3)
    x = _values(T * h, 13)
    gates = _values(T * TOP_K, 14)
    dy = _values(T * h, 15)
    # LoRA terms of the same order as the base terms, so a wrong scaling shows.
    gua, gub = _values(e * r_ * h, 16, 0.5), _values(2 * i * e * r_, 17, 0.5)
    dna, dnb = _values(e * r_ * i, 18, 1.0), _values(h * e * r_, 19, 1.0)
    data = _safetensors(
        {
            "gate_up_proj": ("BF16", [e, 2 * i, h], gu),
            "down_proj": ("BF16", [e, h, i], dn),
            "expert_ids": ("I32", [T, TOP_K], IDS),
            "x": ("BF16", [T, h], x),
            "gates": ("BF16", [T, TOP_K], gates),
            "dy": ("BF16", [T, h], dy),
            "gate_up_lora_a": ("BF16", [e * r_, h], gua),
            "gate_up_lora_b": ("BF16", [2 * i, e * r_], gub),
            "down_lora_a": ("BF16", [e * r_, i], dna),
            "down_lora_b": ("BF16", [h, e * r_], dnb),
        },
        {"mode": "block", "scaling": "0.5", "down_scaling": "1.5"},
    )
    r = mxmoe.run_file(data, cpu=True)
    assert r.warnings == []
    assert r.metadata["mxmoe.mode"] == "block"
    assert "one MoE block" in r.problem
    shapes = {name: t[1] for name, t in r.tensors.items()}
    assert shapes == {
        "out": [T, h],
        "d_x": [T, h],
        "d_gates": [T, TOP_K],
        "d_gate_up_lora_a": [e * r_, h],
        "d_gate_up_lora_b": [2 * i, e * r_],
        "d_down_lora_a": [e * r_, i],
        "d_down_lora_b": [h, e * r_],
    }
    assert _floats(r.tensors["d_gates"])[5] == 0.0  # the dropped slot

    # The forward in f64: [g | u] = x W_gu^T + 0.5 (x A^T) B^T, out[t] = sum_j gates * down(silu(g) u).
    def linear(wts, rows, cols, a, b, s, ex, v):
        y = _matvec([wts[(ex * rows + q) * cols : (ex * rows + q + 1) * cols] for q in range(rows)], v)
        xa = sum(a[ex * cols + c] * v[c] for c in range(cols))  # rank 1: row ex of A
        return [y[q] + s * xa * b[q * e + ex] for q in range(rows)]

    want = [0.0] * (T * h)
    for p, ex in enumerate(IDS):
        t = p // TOP_K
        if ex < 0:
            continue
        g_u = linear(gu, 2 * i, h, gua, gub, 0.5, ex, x[t * h : (t + 1) * h])
        act = [g_u[q] / (1 + math.exp(-g_u[q])) * g_u[i + q] for q in range(i)]
        y = linear(dn, h, i, dna, dnb, 1.5, ex, act)
        for c in range(h):
            want[t * h + c] += gates[p] * y[c]
    _assert_close(_floats(r.tensors["out"]), want, "out", rel=2**-5)


def test_run_file_errors(tmp_path):
    good = {
        "w": ("BF16", [2, 16, 64], _values(2 * 16 * 64, 1)),
        "expert_ids": ("I32", [T, TOP_K], IDS),
        "x": ("BF16", [T, 64], _values(T * 64, 2)),
    }
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.run_file(_safetensors(good, {"mode": "layer"}), cpu=True)
    assert "`mode` is `layer`" in str(err.value)
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.run_file(_safetensors(good), cpu=True, strategy="fused")
    assert "needs MXFP4 weights" in str(err.value)
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.run_file(_safetensors(good), cpu=True, strategy="fast")
    assert str(err.value).startswith("strategy:")
    bad = dict(good, w=("BF16", [2, 1, 64], _values(2 * 64, 1)))
    with pytest.raises(mxmoe.MxmoeError) as err:
        mxmoe.run_file(_safetensors(bad), cpu=True)
    assert "K = 64 and N = 1 must be positive multiples of 8" in str(err.value)
    # The output may not replace the input.
    path = tmp_path / "in.safetensors"
    path.write_bytes(_safetensors(good))
    with pytest.raises(ValueError, match="is the inputs file"):
        mxmoe.run_file(path, tmp_path / "." / "in.safetensors", cpu=True)
    assert path.read_bytes() == _safetensors(good)


NVFP4_GOLDEN = GOLDEN.parent / "nvfp4_golden_torchao.safetensors"


@pytest.fixture(scope="module")
def nv_golden():
    if not NVFP4_GOLDEN.exists():
        pytest.skip(f"NVFP4 golden file not found at {NVFP4_GOLDEN}")
    return mxmoe.read_safetensors(NVFP4_GOLDEN)


@pytest.mark.parametrize("tag,two_level", [("single", False), ("two_level", True)])
def test_nvfp4_quantize_and_dequantize_match_torchao_bit_for_bit(nv_golden, tag, two_level):
    _, (e, n, k), data = nv_golden["input_bf16"]
    packed, scales, tensor_scales = mxmoe.quantize_nvfp4_bytes(data, e, n, k, dtype="bf16",
                                                               two_level=two_level)
    assert packed == nv_golden[f"{tag}_packed"][2]
    assert scales == nv_golden[f"{tag}_scales"][2]
    if two_level:
        assert tensor_scales == nv_golden["two_level_tensor_scales"][2]
    else:
        assert tensor_scales is None
    for dtype, name in (("f32", "dequant_f32"), ("bf16", "dequant_bf16")):
        out = mxmoe.dequantize_nvfp4_bytes(packed, scales, e, n, k, tensor_scales, dtype)
        want = b"".join(nv_golden[f"{name}_{tag}_{x}"][2] for x in range(e))
        assert out == want, (tag, dtype)


def test_nvfp4_errors_are_typed():
    with pytest.raises(mxmoe.MxmoeError, match="multiple of the block size 16"):
        mxmoe.quantize_nvfp4_bytes(b"\0" * 4 * 24, 1, 1, 24)
    with pytest.raises(mxmoe.MxmoeError, match="all zeros"):
        mxmoe.quantize_nvfp4_bytes(b"\0" * 4 * 16, 1, 1, 16, two_level=True)
    with pytest.raises(mxmoe.MxmoeError, match="NaN"):
        mxmoe.dequantize_nvfp4_bytes(b"\0" * 8, b"\x7f", 1, 1, 16)
    with pytest.raises(mxmoe.MxmoeError, match="tensor scale"):
        mxmoe.dequantize_nvfp4_bytes(b"\0" * 8, b"\x38", 1, 1, 16, b"\0" * 4)
