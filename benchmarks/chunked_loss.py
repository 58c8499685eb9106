"""Peak memory and time of the causal-LM loss: full logits (transformers) vs chunked over hidden states.

    python benchmarks/chunked_loss.py [--tokens 8192] [--vocab 32000] [--hidden 1024] [--repeats 3]

Both variants compute the loss and its gradients (hidden states and output weight) in float32
from the same inputs: "standard" is ``hidden @ W.T`` then transformers' ``ForCausalLMLoss``;
"chunked" is ``hf_longctx.training.causal_lm_loss``. Each measurement runs in a fresh process:
peak memory is the growth of the process's resident set (``VmHWM``, reset after the inputs
exist) during forward + backward, so it counts every temporary of the loss. Prints a markdown
table of medians over ``--repeats`` runs, with the ratio chunked / standard.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, tokens: int, vocab: int, hidden_size: int, chunk_size: int) -> dict:
    """One forward + backward of ``variant`` in this process: peak extra MiB and seconds."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from hf_longctx.training import causal_lm_loss

    def step(n: int):
        torch.manual_seed(0)
        hidden = torch.randn(1, n, hidden_size, requires_grad=True)
        weight = (torch.randn(vocab, hidden_size) * hidden_size**-0.5).requires_grad_()
        labels = torch.randint(0, vocab, (1, n))
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        base = _status_kib("VmRSS")
        start = time.perf_counter()
        if variant == "standard":
            loss = ForCausalLMLoss(hidden @ weight.t(), labels, vocab)
        else:
            loss = causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
        loss.backward()
        return loss, time.perf_counter() - start, base

    step(min(tokens, 64))  # warm-up: one-time library initialisation is not part of the loss
    loss, seconds, base = step(tokens)
    return {"peak_mib": (_status_kib("VmHWM") - base) / 1024, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=["standard", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.vocab, args.hidden, args.chunk_size)))
        return

    from tqdm import tqdm

    shape = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
             "--chunk_size", str(args.chunk_size)]
    results: dict[str, list[dict]] = {"standard": [], "chunked": []}
    runs = [(variant, i) for i in range(args.repeats) for variant in results]  # interleaved, side by side
    for variant, _ in tqdm(runs, desc="fresh-process runs"):
        out = subprocess.run([sys.executable, __file__, "--measure", variant, *shape], check=True,
                             capture_output=True, text=True).stdout
        results[variant].append(json.loads(out.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "seconds", "loss")} for v, rs in results.items()}
    print(f"\nN = {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, float32, chunk {args.chunk_size}; "
          f"forward + backward, median of {args.repeats} fresh processes each\n")
    print("| loss | peak extra memory (MiB) | time (s) | loss value |")
    print("|---|---:|---:|---:|")
    for variant, m in med.items():
        print(f"| {variant} | {m['peak_mib']:.0f} | {m['seconds']:.2f} | {m['loss']:.6f} |")
    print(f"| **chunked / standard** | **{med['chunked']['peak_mib'] / med['standard']['peak_mib']:.3f}** | "
          f"**{med['chunked']['seconds'] / med['standard']['seconds']:.2f}** | |")


if __name__ == "__main__":
    main()
