"""The `flowsteer` command as a user runs it."""
import json
import subprocess
import sys


def _run(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "flowsteer.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_info_prints_backend_info():
    info = json.loads(_run("info"))
    assert {"backend", "extension", "cpu_pick", "triton"} <= set(info)


def test_quick_example_runs_and_the_ratio_is_one():
    out = _run("example")
    assert "max |ratio - 1| = 0.0e+00" in out


def test_bench_rollout_smoke(tmp_path):
    path = tmp_path / "rollout.json"
    _run("bench", "rollout", "--steps", "2", "--group-size", "2", "--branch-group-size", "2", "--size", "8",
         "--max-sequence-length", "16", "--device", "cpu", "--repeats", "1", "--out", str(path))
    results = json.loads(path.read_text())
    assert results["speedup"] > 0 and results["branch_speedup"] > 0
