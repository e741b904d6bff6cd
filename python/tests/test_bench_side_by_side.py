"""python/bench/side_by_side.py on the CPU (issue #15): its ``--cpu-check`` (the torch baseline,
the exact MXFP4 decode, the torch-dequant row and the correctness guard against a dense
reference, and the guard rejecting wrong variants), and the whole harness (one subprocess per
row, table, JSON, the guard stopping a wrong row) with ``--device cpu`` on the tiny shapes.
Without torch these skip; no GPU is needed (the mxmoe rows are GPU-only and report an error).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "side_by_side.py"


def _env():
    """This interpreter's torch (and whatever PYTHONPATH already names) for the subprocesses."""
    env = os.environ.copy()
    torch_site = str(pathlib.Path(torch.__file__).resolve().parents[1])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts + ([torch_site] if torch_site not in parts else []))
    return env


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _have_mxmoe_quantizer():
    try:
        import mxmoe

        return hasattr(mxmoe, "quantize")
    except Exception:
        return False


def test_cpu_check(tmp_path):
    done = _run("--cpu-check", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cpu-check OK" in done.stdout, done.stdout
    assert "FAIL" not in done.stdout, done.stdout
    # The guard's self-test ran: wrong variants were rejected.
    assert "guard rejects a wrong variant (rows left in expert order)" in done.stdout


def test_harness_on_cpu(tmp_path):
    out = tmp_path / "sbs.json"
    done = _run("--device", "cpu", "--shapes", "tiny-down",
                "--variants", "torch-bf16-grouped_mm,torch-dequant-grouped_mm,mxmoe-mxfp4-fused,"
                "mxmoe-mxfp4-fused-split-lora",
                "--iters", "2", "--warmup", "1", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| shape | variant | median ms | vs torch bf16 | peak MiB | guard |" in done.stdout
    d = json.loads(out.read_text())
    assert d["complete"] and d["guard_failures"] == []
    assert d["header"]["mxmoe_commit"]
    rows = {r["variant"]: r for r in d["rows"]}
    base = rows["torch-bf16-grouped_mm"]
    assert base["median_ms"] > 0 and len(base["times_ms"]) == 2
    assert base["ratio_vs_torch_bf16"] == pytest.approx(1.0)
    assert base["guard"]["ok"] and base["guard"]["worst"] <= 5e-2
    assert "per-expert loop" in base["label"]  # on the CPU, labelled as such
    deq = rows["torch-dequant-grouped_mm"]
    if _have_mxmoe_quantizer():
        assert deq["guard"]["ok"] and deq["median_ms"] > 0, deq
        assert "dequant all" in deq["label"]
    else:
        assert "error" in deq
    assert "CUDA" in rows["mxmoe-mxfp4-fused"]["error"]  # GPU-only: an error row, not a crash
    assert "CUDA" in rows["mxmoe-mxfp4-fused-split-lora"]["error"]


def test_guard_stops_a_wrong_row(tmp_path):
    out = tmp_path / "sbs.json"
    done = _run("--device", "cpu", "--shapes", "tiny", "--variants", "torch-bf16-grouped_mm",
                "--iters", "2", "--warmup", "1", "--fault", "lora-x2", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "GUARD FAILED" in done.stdout and "GUARD FAILED" in done.stderr
    d = json.loads(out.read_text())
    assert d["guard_failures"] == ["tiny / torch-bf16-grouped_mm"]
    (row,) = d["rows"]
    assert row["guard_failed"] and "median_ms" not in row and "times_ms" not in row
