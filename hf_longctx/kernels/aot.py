"""Ahead-of-time compilation of the attention kernels for a GPU architecture, without a GPU.

Each kernel (forward, backward dq, backward dk/dv) is compiled the way its launcher would
launch it on a CUDA tensor: the launcher (`flash_attention._flash_forward` / `_flash_backward`)
runs on CPU tensors of the given shapes with a recording `launch`, Triton's own argument
specialisation (alignment, divisibility by 16, integers equal to 1) is applied to what it
recorded, and `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` builds it.
With `TRITON_DUMP_PTXAS_LOG=1` Triton prints the `-v` report of its own ptxas run (registers,
spill stores and loads, stack); `.metadata.shared` is the shared memory per block.

Compilation needs Triton's compiler, not its interpreter: run this in a process where
`TRITON_INTERPRET` is unset (the tests start one). It needs the `ptxas` that the triton wheel
ships (`triton/backends/nvidia/bin/ptxas`) or `TRITON_PTXAS_PATH`, and no GPU.

    python -m hf_longctx.kernels.aot [--arch 80 90] [--head_dim 64 128] [--jobs 2]

prints one row per kernel x mask variant x head dim x architecture, with the occupancy that
the registers and shared memory imply (resident warps per SM).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

KERNELS = ("fwd", "dq", "dkdv")
KERNEL_NAMES = {"fwd": "forward", "dq": "backward dq", "dkdv": "backward dk/dv"}
# The mask variants users run, as flash_attention options. "window+sinks" is gpt-oss's and StreamingLLM's
# (a window, sink tokens and per-head sink logits); "packed" is packed documents (cu_seqlens).
VARIANTS = {
    "causal": dict(causal=True),
    "window+sinks": dict(causal=True, window=1024, sink_tokens=4, sink_logits=True),
    "alibi": dict(causal=True, alibi=True),
    "softcap": dict(causal=True, softcap=50.0),
    "packed": dict(causal=True, packed=True),
}
ARCHS = (80, 90)
HEAD_DIMS = (64, 128)
# Per-SM limits (CUDA occupancy calculator): registers, resident warps and blocks, shared memory per SM and the
# most one block may opt in to, and what the runtime reserves per block.
SM = {
    80: dict(registers=65536, warps=64, blocks=32, shared_sm=167936, shared_block=166912, reserved=1024),
    90: dict(registers=65536, warps=64, blocks=32, shared_sm=233472, shared_block=232448, reserved=1024),
}
# Bounds the ahead-of-time test holds the kernels to: spill stores per thread (bytes), forward none; the backward
# at most what Triton's tutorial fused backward (06-fused-attention, 8 warps / 3 stages) spills compiled the same way.
SPILL_BOUNDS = {
    ("fwd", 80, 64): 0, ("fwd", 80, 128): 0, ("fwd", 90, 64): 0, ("fwd", 90, 128): 0,
    ("dq", 80, 64): 80, ("dq", 80, 128): 1740, ("dq", 90, 64): 60, ("dq", 90, 128): 1276,
    ("dkdv", 80, 64): 80, ("dkdv", 80, 128): 1740, ("dkdv", 90, 64): 60, ("dkdv", 90, 128): 1276,
}


@dataclass
class Report:
    kernel: str
    variant: str
    head_dim: int
    arch: int
    config: dict
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int

    @property
    def warps_per_sm(self) -> int:
        return occupancy(self.arch, self.registers, self.shared, self.config["num_warps"])


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM that registers per thread and shared memory per block allow (CUDA's occupancy rules:
    registers are allocated per warp in units of 256, shared memory per block plus 1 KB reserved)."""
    sm = SM[arch]
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(sm["registers"] // (per_warp * num_warps), sm["warps"] // num_warps, sm["blocks"])
    if shared:
        blocks = min(blocks, sm["shared_sm"] // (shared + sm["reserved"]))
    return blocks * num_warps


def ptxas() -> str | None:
    """The ptxas Triton compiles with (``TRITON_PTXAS_PATH``, else the one its wheel ships), or None."""
    path = os.environ.get("TRITON_PTXAS_PATH")
    if path:
        return path if os.path.isfile(path) else None
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _inputs(variant: str, head_dim: int, tokens: int, dtype):
    """CPU tensors shaped as a long-context layer's (batch 1, 8 query heads over 2 KV heads) and the options."""
    import torch

    options = dict(VARIANTS[variant])
    packed = options.pop("packed", False)
    q = torch.zeros(1, 8, tokens, head_dim, dtype=dtype)
    k = torch.zeros(1, 2, tokens, head_dim, dtype=dtype)
    v = torch.zeros_like(k)
    alibi = torch.ones(8) if options.pop("alibi", False) else None
    sinks = torch.zeros(8, dtype=dtype) if options.pop("sink_logits", False) else None
    cu = torch.tensor([0, tokens // 4, tokens // 2 + 7, tokens], dtype=torch.int32) if packed else None
    return q, k, v, alibi, sinks, cu, options


def launches(variant: str, head_dim: int, config: dict, tokens: int = 4096) -> dict:
    """``{kernel: (jit function, args, kwargs)}`` as the launcher passes them for a bf16 CUDA tensor."""
    import torch

    fa = importlib.import_module(f"{__package__}.flash_attention")  # the package exports the function

    q, k, v, alibi, sinks, cu, options = _inputs(variant, head_dim, tokens, torch.bfloat16)
    recorded = {}
    names = iter(KERNELS)

    def record(kernel, grid, *args, **kwargs):
        recorded[next(names)] = (kernel, args, kwargs)

    lengths = fa._lengths(cu, tokens, tokens)
    mask = dict(causal=options.get("causal", True), window=options.get("window"),
                sink_tokens=options.get("sink_tokens", 0), softcap=options.get("softcap"), scale=head_dim ** -0.5)
    out, lse = fa._flash_forward(q, k, v, lengths, alibi, sinks, cu, config=config, launch=record, **mask)
    fa._flash_backward(torch.zeros_like(q), q, k, v, out, torch.zeros_like(lse), lengths, alibi, cu, config=config,
                       launch=record, **mask)
    return recorded


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_kernel(kernel, args, kwargs, arch: int):
    """Compile one recorded launch for sm_``arch``: (compiled kernel, ptxas report text)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def report(kernel_name: str, variant: str, head_dim: int, arch: int, config: dict | None = None) -> Report:
    """Compile one kernel x variant x head dim for sm_``arch`` with ``config`` (default: the launcher's own)."""
    from .flash_attention import launch_config

    config = config or launch_config(arch, head_dim)
    kernel, args, kwargs = launches(variant, head_dim, config)[kernel_name]
    compiled, log = compile_kernel(kernel, args, kwargs, arch)
    registers = _PTXAS.findall(log)
    spills = _SPILLS.findall(log)
    if not registers or not spills:
        raise RuntimeError(f"no ptxas report in Triton's output for {kernel_name} {variant} D={head_dim} "
                           f"sm_{arch}:\n{log}")
    stack, stores, loads = map(int, spills[-1])
    return Report(kernel_name, variant, head_dim, arch, config[kernel_name], int(registers[-1]), stores, loads, stack,
                  int(compiled.metadata.shared))


def _report_dict(job) -> dict:
    kernel_name, variant, head_dim, arch, config = job
    return asdict(report(kernel_name, variant, head_dim, arch, config))


def reports(jobs, workers: int = 1) -> list[Report]:
    """Reports for (kernel, variant, head dim, arch, config or None) jobs, in ``workers`` processes."""
    jobs = list(jobs)
    if workers <= 1:
        dicts = [_report_dict(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            dicts = list(pool.map(_report_dict, jobs))
    return [Report(**d) for d in dicts]


def within_bounds(r: Report) -> list[str]:
    """What a report breaks: spills past `SPILL_BOUNDS` (D=256 held to D=128's), shared memory past the arch's."""
    problems = []
    bound = SPILL_BOUNDS[(r.kernel, r.arch, min(r.head_dim, 128))]
    if max(r.spill_stores, r.spill_loads) > bound:
        problems.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads > {bound} B")
    if r.shared > SM[r.arch]["shared_block"]:
        problems.append(f"shared memory {r.shared} B > {SM[r.arch]['shared_block']} B")
    return problems


def table(rows: list[Report]) -> str:
    lines = ["| kernel | variant | D | arch | BLOCK_M x BLOCK_N, warps, stages | registers | spill stores (B) | "
             "spill loads (B) | stack (B) | shared (KB) | warps / SM |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r.config
        lines.append(f"| {KERNEL_NAMES[r.kernel]} | {r.variant} | {r.head_dim} | sm_{r.arch} | "
                     f"{c['BLOCK_M']} x {c['BLOCK_N']}, {c['num_warps']}, {c['num_stages']} | {r.registers} | "
                     f"{r.spill_stores} | {r.spill_loads} | {r.stack} | {r.shared / 1024:.1f} | {r.warps_per_sm} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile the attention kernels for GPU architectures (no GPU "
                                                 "needed) and print registers, spills, shared memory, occupancy.")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--head_dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--config", type=json.loads, default=None,
                        help='JSON launch config to compile instead of the launcher\'s, e.g. '
                             '\'{"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, ...}\'')
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", help="also write the reports to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 is set: Triton would interpret the kernels instead of compiling them; unset it")
    if ptxas() is None:
        sys.exit("no ptxas: the triton wheel ships triton/backends/nvidia/bin/ptxas; set TRITON_PTXAS_PATH")
    jobs = [(k, v, d, a, args.config) for a in args.arch for d in args.head_dim for k in args.kernel
            for v in args.variant]
    rows = reports(jobs, args.jobs)
    print(table(rows))
    bad = [(r, p) for r in rows for p in [within_bounds(r)] if p]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} builds within the bounds")
    for r, p in bad:
        print(f"  {r.kernel} {r.variant} D={r.head_dim} sm_{r.arch}: {'; '.join(p)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
