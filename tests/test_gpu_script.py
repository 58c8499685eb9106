"""benchmarks/gpu.sh and benchmarks/gpu_table.py without a GPU: every section runs on CPU-sized inputs, and the
GPU run refuses at once with a clear message instead of failing half-way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("attention", "extend prefill", "moe fwd+bwd", "tiling memory", "longest fine-tune step")


def _run(*command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(list(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_table_smoke_run_fills_every_section(tmp_path):
    out = tmp_path / "table.md"
    proc = _run(sys.executable, "benchmarks/gpu_table.py", "--device", "cpu", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| section")]
    assert {r[0] for r in rows} == set(SECTIONS)
    assert not [r for r in rows if r[1] == "failed" or "skipped" in r[2]], rows
    assert len([r for r in rows if r[0] == "attention"]) == 2 * 2 * 2 * 2  # D x N x mask x direction


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_runs_refuse_without_cuda(tmp_path):
    proc = _run(sys.executable, "benchmarks/gpu_table.py", timeout=120)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
    proc = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "gpu_table.md").exists()
