"""CPU tests: import, the quantizer/dequantizer against torchao's golden file, clear errors.

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
    for name in ("quantize_mxfp4_bytes", "dequantize_mxfp4_bytes", "read_safetensors"):
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
