"""Model-level cost of the ``attention`` patch: a windowed llama forward, backend by backend.

    python benchmarks/attention_backend.py [--lengths 4096 8192] [--repeats 3] [--threads 1] [--out FILE]

A random llama (hidden 512, 8 heads of 64, 2 layers, fp32, CPU) patched with
``sliding_window: 512, sink_tokens: 4``: ``backend: auto`` (the kernels' blocked O(N·W)
path on the CPU) against ``backend: sdpa`` (the explicit ``[N, N]`` window + sink mask,
the same math transformers would run with a custom mask), and the unpatched model with
full causal SDPA (``is_causal``, no mask) for scale. The three are timed alternately,
repeat after repeat, so that load on a shared machine hits all alike; medians in seconds.
``--threads 1`` on a shared, overloaded machine: there, a second torch thread that gets
descheduled stalls every parallel region, which hurts the blocked path's many small ops most.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from tqdm import tqdm

import hf_longctx
from hf_longctx.testing import cpu_name, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = tiny_model("llama", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=8, head_dim=64, max_position_embeddings=max(args.lengths))
    models = {"unpatched sdpa (full causal)": base}
    for backend in ("auto", "sdpa"):
        models[f"patched {backend}"] = hf_longctx.patch(
            copy.deepcopy(base), {"attention": {"backend": backend, "sliding_window": 512, "sink_tokens": 4}})

    rows = []
    for n in args.lengths:
        ids = torch.randint(3, 128, (1, n))
        times = {name: [] for name in models}
        with torch.no_grad():
            for name, model in models.items():  # warm-up
                model(ids, use_cache=False)
            for _ in tqdm(range(args.repeats), desc=f"N={n}"):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(ids, use_cache=False)
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append((n, med))

    names = list(models)
    lines = [f"Machine: {cpu_name()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, {torch.get_num_threads()} thread(s); fp32, B=1, W=512, S=4, 2 layers, 8x64 heads; "
             f"median of {args.repeats} forwards (seconds).", "",
             "| N | " + " | ".join(names) + " | sdpa-mask / auto |",
             "|---|" + "---|" * (len(names) + 1)]
    for n, med in rows:
        cells = " | ".join(f"{med[name]:.3f}" for name in names)
        lines.append(f"| {n} | {cells} | {med['patched sdpa'] / med['patched auto']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# attention backend (model level)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
