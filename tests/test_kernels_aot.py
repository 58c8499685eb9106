"""The attention kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200), no GPU needed.

Every kernel (forward, backward dq, backward dk/dv) x mask variant (causal, window + sinks,
ALiBi, softcap, packed documents) x head dim (64, 128) x architecture is compiled in bf16
with the launcher's own launch configuration for that architecture, through
`hf_longctx.kernels.aot` (Triton's own ptxas run and report). The bounds: the forward spills
nothing; dq and dk/dv spill at most what Triton's tutorial fused backward (06-fused-attention,
8 warps / 3 stages) spills compiled the same way: 80 / 1,740 B on sm_80 and 60 / 1,276 B on
sm_90 for D = 64 / 128; shared memory within each architecture's per-block limit (sm_80
163 KB, sm_90 227 KB). The compile runs once per session in a process of its own (the tests
interpret Triton, which cannot compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_longctx.kernels import aot
from hf_longctx.kernels.flash_attention import LAUNCH_CONFIGS, launch_config

REPO = Path(__file__).resolve().parents[1]
BUILDS = [(k, v, d, a) for a in aot.ARCHS for d in aot.HEAD_DIMS for k in aot.KERNELS for v in aot.VARIANTS]
needs_ptxas = pytest.mark.skipif(aot.ptxas() is None, reason="no ptxas: the installed triton does not ship "
                                 "triton/backends/nvidia/bin/ptxas and TRITON_PTXAS_PATH is not set")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict:
    """Every build's report, compiled once per test session (two processes)."""
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "hf_longctx.kernels.aot", "--jobs", "2", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {(r["kernel"], r["variant"], r["head_dim"], r["arch"]): aot.Report(**r)
            for r in json.loads(out.read_text())}


@needs_ptxas
def test_every_build_compiles(compiled):
    assert sorted(compiled) == sorted(BUILDS)
    for r in compiled.values():
        assert r.config == launch_config(r.arch, r.head_dim)[r.kernel]  # the launcher's own configuration
        assert 0 < r.registers <= 255 and r.shared > 0


@needs_ptxas
@pytest.mark.parametrize("kernel, variant, head_dim, arch", BUILDS, ids=["-".join(map(str, b)) for b in BUILDS])
def test_spills_and_shared_memory_within_bounds(compiled, kernel, variant, head_dim, arch):
    r = compiled[(kernel, variant, head_dim, arch)]
    limit = {"fwd": 0, "dq": None, "dkdv": None}[kernel]
    if limit is None:  # the tutorial backward's 8-warp figures
        limit = {(80, 64): 80, (80, 128): 1740, (90, 64): 60, (90, 128): 1276}[(arch, head_dim)]
    assert r.spill_stores <= limit and r.spill_loads <= limit, (
        f"{r.spill_stores} B spill stores, {r.spill_loads} B spill loads per thread > {limit} B")
    assert r.shared <= {80: 163 * 1024, 90: 227 * 1024}[arch], f"{r.shared} B of shared memory"
    assert aot.within_bounds(r) == []  # the module's own check (used by its CLI) agrees


def test_occupancy_follows_the_cuda_rules():
    # 255 registers: 8 warps of 32 threads x 256 registers per warp-allocation unit of 256 -> 8 x 8160 per block
    assert aot.occupancy(80, 255, 0, 4) == 8  # 65536 // (8192 * 4) = 2 blocks of 4 warps
    assert aot.occupancy(90, 128, 0, 4) == 16  # 65536 // (4096 * 4) = 4 blocks
    assert aot.occupancy(80, 64, 0, 4) == 32
    assert aot.occupancy(80, 32, 0, 4) == 64  # the SM's 64 warps
    assert aot.occupancy(80, 64, 100 * 1024, 4) == 4  # shared memory: one 100 KB block of 164 KB
    assert aot.occupancy(90, 64, 100 * 1024, 4) == 8  # two of 228 KB


@pytest.mark.parametrize("capability, row", [((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((7, 5), 80),
                                             ((9, 0), 90), ((10, 0), 90), ((12, 0), 80), (90, 90), (80, 80)])
@pytest.mark.parametrize("head_dim, bucket", [(32, 64), (64, 64), (96, 128), (128, 128)])
def test_launch_config_follows_the_capability_and_head_dim(capability, row, head_dim, bucket):
    assert launch_config(capability, head_dim) == LAUNCH_CONFIGS[(row, bucket)]
    config = launch_config(capability, head_dim)
    config["fwd"]["BLOCK_M"] = 1  # a copy: the table itself is never changed by a caller
    assert LAUNCH_CONFIGS[(row, bucket)]["fwd"]["BLOCK_M"] != 1


@needs_ptxas
def test_sm80_rows_fit_the_smaller_shared_memory_of_sm86_to_sm120(compiled):
    assert max(r.shared for r in compiled.values() if r.arch == 80) <= 99 * 1024


def test_aot_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "hf_longctx.kernels.aot", "--arch", "80"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1 is set" in proc.stderr
