"""The conformance matrix: every causal-LM model type of the installed transformers, every section.

Each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built tiny from its own config
(:func:`hf_longctx.testing.tiny_config`, 16 trained positions, weights drawn at std 0.2 and
softcaps of 3 so that scales and caps bite), and every section runs against transformers' own
oracle:

============  ==============================================================================
rope          each rope type vs the same model built from the native scaled config; save ->
              plain ``from_pretrained`` gives the same logits where the config class holds the
              type natively, else the unpatched model (and ``hf_longctx.from_pretrained`` the
              patched one)
window        ``attention.sliding_window`` wider than the input = the unpatched model
sinks         a narrow window + sink tokens: finite logits that differ from the unpatched ones
loss          ``loss.chunk_size``: the model's own loss (router losses included), aux loss and gradients
streaming     streaming with a window wider than the generation: the same greedy tokens
moe           copy upcycling: the same logits
unpatch       after each section above, ``unpatch`` gives bit-identical logits, config and weights
============  ==============================================================================

A cell is ``pass``, ``refused`` (``patch`` raised a SpecError; its message is the reason) or
``FAIL`` (a wrong answer or any other exception). ``python -m hf_longctx.conformance`` runs the
matrix and writes ``docs/families.md``.
"""

from __future__ import annotations

import copy
import logging
import signal
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .config_base import SpecError

logger = logging.getLogger(__name__)

SECTIONS = ("rope", "window", "sinks", "loss", "streaming", "moe", "unpatch")
ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
TRAINED = 16  # max_position_embeddings of the matrix's configs
LENGTH = 24  # input length of the non-rope sections
LONG = 3 * TRAINED  # rope inputs reach past the trained length
FACTOR = 4.0
MATRIX_OVERRIDES = dict(
    max_position_embeddings=TRAINED,
    initializer_range=0.2,
    sliding_window=8,  # hybrid models: their sliding layers really slide on LENGTH tokens
    final_logit_softcapping=3.0,
    attn_logit_softcapping=3.0,
)
MAX_PARAMETERS = 5_000_000  # a tiny config that still builds more than this is too large to run here
SLOW_S = 0.5  # a tiny model whose own forward is slower than this (pure-PyTorch scan fallbacks) is not run
TIMEOUT_S = 30  # per model type


@dataclass
class Cell:
    status: str  # pass | refused | FAIL
    reason: str = ""

    def render(self) -> str:
        return self.status if not self.reason else f"{self.status}: {self.reason}"


@dataclass
class Row:
    model_type: str
    built: str = ""  # empty when the tiny model was built, else why not
    cells: dict[str, Cell] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        return [name for name, cell in self.cells.items() if cell.status == "FAIL"]

    @property
    def passes(self) -> bool:
        """Built, every section passed or refused, and at least one passed."""
        return (not self.built and not self.failures
                and any(cell.status == "pass" for cell in self.cells.values()))


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 160 else text[:157] + "..."


def matrix_config(model_type: str):
    """The matrix's tiny config of a model type, or of a real long-context rope (``LONG_CONTEXT_CONFIGS``:
    its own rope parameters and context length, the matrix's other overrides)."""
    from transformers import CONFIG_MAPPING

    from .testing import LONG_CONTEXT_CONFIGS, long_context_config, tiny_config

    if model_type in LONG_CONTEXT_CONFIGS:
        base, values = LONG_CONTEXT_CONFIGS[model_type]
        defaults = CONFIG_MAPPING[base]().get_text_config(decoder=True).to_dict()
        overrides = {k: v for k, v in MATRIX_OVERRIDES.items() if k in defaults and k not in values}
        overrides.pop("max_position_embeddings", None)
        return long_context_config(model_type, **overrides)
    defaults = CONFIG_MAPPING[model_type]().get_text_config(decoder=True).to_dict()
    overrides = {k: v for k, v in MATRIX_OVERRIDES.items() if k in defaults}
    return tiny_config(model_type, **overrides)


def build(model_type: str):
    """The matrix's tiny model of ``model_type`` in eval mode (float32, seed 0)."""
    from transformers import AutoModelForCausalLM

    config = matrix_config(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size:,} parameters")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and torch.all(param == 0):
                param.normal_(0.0, 0.2)  # zero biases: give every path a value
    return model


def _tokens(length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 128), (1, length), generator=generator)


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def _close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-4) -> tuple[bool, float]:
    error = (ours - theirs).abs().max().item()
    return bool(torch.isfinite(ours).all()) and error <= tolerance * max(1.0, theirs.abs().max().item()), error


class _Wrong(Exception):
    """A wrong answer."""


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise _Wrong(message)


def _snapshot(model, x):
    from .patching import base_model

    target = base_model(model)
    return _logits(model, x), target.config.to_dict(), {k: v.clone() for k, v in target.state_dict().items()}


def _check_unpatch(model, x, snap) -> str | None:
    """None when ``unpatch`` restores bit-identical logits, config and weights, else what differs."""
    from . import unpatch

    logits, config, state = snap
    target = unpatch(model)
    if not torch.equal(_logits(target, x), logits):
        return "logits differ after unpatch"
    if target.config.to_dict() != config:
        return "config differs after unpatch"
    now = target.state_dict()
    if set(now) != set(state) or any(not torch.equal(v, state[k]) for k, v in now.items()):
        return "weights differ after unpatch"
    return None


def _rope_spec(model, rope_type: str) -> dict:
    from .positions.rope import rotary_dims

    section = {"type": rope_type, "factor": FACTOR}
    if rope_type == "longrope":
        half = max(rotary_dims(model).values(), default=2) // 2
        ramp = [i / max(1, half - 1) for i in range(half)]
        section.update(short_factor=[1.0 + 0.5 * r for r in ramp], long_factor=[1.0 + (FACTOR - 1.0) * r for r in ramp])
    return section


def _native_twin(model, patched_config):
    """transformers' own model built from the scaled config (set on the config object, as the patch
    sets it, so that a config class's rewrite on load is not part of the oracle), same weights."""
    torch.manual_seed(0)
    twin = type(model)(copy.deepcopy(patched_config)).eval()  # the same class (Emu3's text config has no Auto class)
    twin.load_state_dict(model.state_dict())
    return twin


def _check_reload(model, rope_type: str, logits: Callable, ours, unpatched, native: bool, tolerance: float) -> None:
    """Save; plain transformers (its own class, no plugin) gives the patched logits where the rope is native,
    else the unpatched ones, and ``hf_longctx.from_pretrained`` the patched ones."""
    from . import from_pretrained, save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        ok, error = _close(logits(type(model).from_pretrained(tmp).eval()), ours if native else unpatched, tolerance)
        _expect(ok, f"{rope_type}: plain reload ({'native' if native else 'original'} config) off by {error:.2e}")
        if not native:
            ok, error = _close(logits(from_pretrained(tmp).eval()), ours, tolerance)
            _expect(ok, f"{rope_type}: hf_longctx.from_pretrained off by {error:.2e}")


def _rope_type(model, rope_type: str, x, unpatched, unpatch_errors: list[str]) -> Cell:
    from . import patch
    from .positions.rope import native

    snap = (unpatched, model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    try:
        patch(model, {"rope": _rope_spec(model, rope_type)})
    except SpecError as err:
        return Cell("refused", _one_line(err))
    try:
        ours = _logits(model, x)
        # a patch that the model ignores would match an oracle that ignores the same config values
        changed, change = _close(ours, unpatched, 1e-6)
        _expect(not changed, f"{rope_type}: no change past the trained length (max diff {change:.2e})")
        config = copy.deepcopy(model.config)
        del config.hf_longctx
        ok, error = _close(ours, _logits(_native_twin(model, config), x))
        _expect(ok, f"{rope_type}: differs from the native config by {error:.2e}")
        _check_reload(model, rope_type, lambda m: _logits(m, x), ours, unpatched, native(model), 1e-4)
    finally:
        problem = _check_unpatch(model, x, snap)
        if problem:
            unpatch_errors.append(f"rope {rope_type}: {problem}")
    return Cell("pass")


STACKED_AT = 200_000  # the stacked rows' inputs: contiguous positions beyond the shipped 128k context


def _stacked_rope_type(model, rope_type: str, unpatch_errors: list[str]) -> Cell:
    """A rope type stacked on a shipped scaling: the rotary's frequencies and attention factor at several
    lengths against the from-scratch reference of the rule; save -> plain transformers (native) or
    ``hf_longctx.from_pretrained`` (in memory) gives the same logits; unpatch bit for bit."""
    from . import patch, unpatch
    from .families import get_family
    from .positions.rope import native
    from .testing import reference_stacked_rotation

    text = model.config.get_text_config(decoder=True)
    shipped = copy.deepcopy(text)
    x = _tokens(LENGTH, text.vocab_size)
    positions = STACKED_AT + torch.arange(LENGTH)[None]

    def logits(m):
        with torch.no_grad():
            return m(x, position_ids=positions, attention_mask=torch.ones_like(x)).logits.float()

    unpatched = logits(model)
    snap = (_logits(model, x), model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    spec = _rope_spec(model, rope_type)
    layer_type = "full_attention" if "full_attention" in (text.rope_parameters or {}) else None
    rotary_class = type(get_family(model).rotary_embedding(model))  # transformers' own, before the patch
    try:
        patch(model, {"rope": spec})
    except SpecError as err:
        return Cell("refused", _one_line(err))
    try:
        rotary = get_family(model).rotary_embedding(model)
        prefix = "" if layer_type is None else f"{layer_type}_"
        for length in (LENGTH, 5_000, STACKED_AT, 2 * STACKED_AT, 5 * STACKED_AT):
            with torch.no_grad():
                rotary(torch.zeros(1, 1, 1), torch.tensor([[0, length - 1]]),
                       **({} if layer_type is None else {"layer_type": layer_type}))
            frequencies = getattr(rotary, f"{prefix}inv_freq").double()
            expected, attention = reference_stacked_rotation(shipped, spec, length, layer_type, rotary_class)
            error = ((frequencies - torch.tensor(expected, dtype=torch.float64)).abs()
                     / torch.tensor(expected, dtype=torch.float64).abs().clamp(min=1e-30)).max().item()
            _expect(error <= 2e-6, f"{rope_type}: frequencies at {length} tokens off the rule by {error:.1e}")
            scale = float(getattr(rotary, f"{prefix}attention_scaling"))
            _expect(abs(scale - attention) <= 1e-6 * attention, f"{rope_type}: attention factor {scale} != {attention}")
        unpatch(model)  # afresh: a dynamic rope keeps the frequencies of the longest input it saw
        patch(model, {"rope": spec})
        _check_reload(model, rope_type, logits, logits(model), unpatched, native(model), 1e-5)
    finally:
        problem = _check_unpatch(model, x, snap)
        if problem:
            unpatch_errors.append(f"rope {rope_type}: {problem}")
    return Cell("pass")


def _shipped_scaling(model) -> bool:
    from .positions.rope import rope_types

    return rope_types(model.config.get_text_config(decoder=True)) - {"default"} != set()


def _rope_input(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The rope cells' input and the unpatched logits on it: past the trained length, 3x a tiny config's own
    longer context (up to 128) where the model runs that far, else LONG tokens."""
    text = model.config.get_text_config(decoder=True)
    trained = getattr(text, "max_position_embeddings", None) or 0
    if TRAINED < trained <= 128:
        x = _tokens(3 * trained, text.vocab_size)
        try:
            return x, _logits(model, x)
        except Exception:  # noqa: BLE001  absolute position tables end there: the rope section is refused anyway
            pass
    x = _tokens(LONG, text.vocab_size)
    return x, _logits(model, x)


def _rope(model, unpatch_errors: list[str]) -> Cell:
    if _shipped_scaling(model):
        cells = {t: _stacked_rope_type(model, t, unpatch_errors) for t in ROPE_TYPES}
    else:
        x, unpatched = _rope_input(model)
        cells = {t: _rope_type(model, t, x, unpatched, unpatch_errors) for t in ROPE_TYPES}
    passed = [t for t, c in cells.items() if c.status == "pass"]
    refused = {t: c.reason for t, c in cells.items() if c.status == "refused"}
    if not passed:
        reasons = set(refused.values())
        return Cell("refused", reasons.pop() if len(reasons) == 1 else "; ".join(f"{t}: {r}" for t, r in refused.items()))
    if refused:
        return Cell("pass", f"{', '.join(passed)}; refused {'; '.join(f'{t}: {r}' for t, r in refused.items())}")
    return Cell("pass")


def _section(model, spec: dict, run: Callable, unpatch_errors: list[str], name: str) -> Cell:
    """Patch ``spec``, run the section's check ``run(patched, unpatched_outputs)``, unpatch and compare."""
    from . import patch

    x = _tokens(LENGTH, model.config.get_text_config(decoder=True).vocab_size)
    snap = _snapshot(model, x)
    try:
        reference = run(model, None)
    except Exception as err:  # noqa: BLE001  no oracle: transformers itself fails this check on the model
        return Cell("refused", f"no oracle: transformers itself fails this check ({type(err).__name__}: {_one_line(err)})")
    try:
        patched = patch(model, spec)
    except SpecError as err:
        return Cell("refused", _one_line(err))
    try:
        run(patched, reference)
    finally:
        problem = _check_unpatch(patched, x, snap)
        if problem:
            unpatch_errors.append(f"{name}: {problem}")
    return Cell("pass")


def _logits_check(tolerance: float | None):
    """Logits on LENGTH tokens: equal to the unpatched ones (tolerance) or, with None, finite and different."""
    def run(model, reference):
        logits = _logits(model, _tokens(LENGTH, model.config.get_text_config(decoder=True).vocab_size))
        if reference is None:
            return logits
        ok, error = _close(logits, reference, tolerance or 1e-4)
        if tolerance is not None:
            _expect(ok, f"differs from the unpatched model by {error:.2e}")
        else:
            _expect(bool(torch.isfinite(logits).all()), "non-finite logits")
            _expect(error > 1e-3 * max(1.0, reference.abs().max().item()), f"no change (max diff {error:.2e})")
    return run


def _loss_check(model, reference):
    """The loss with the router losses the model adds (``output_router_logits=True`` where its config has the
    flag), its ``aux_loss``, and every gradient: all gradients together within 1e-5 of the norm of the
    model's own, each parameter's within 1e-4 of its own (plus 1e-6 of the total: some are nearly 0)."""
    config = model.config.get_text_config(decoder=True)
    x = _tokens(LENGTH, config.vocab_size)
    routers = {"output_router_logits": True} if getattr(config, "output_router_logits", None) is not None else {}
    out = model(x, labels=x, **routers)
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, parameters, allow_unused=True)
    aux = out.get("aux_loss")
    ours = (out.loss.detach().float(), None if aux is None else torch.as_tensor(aux).detach().float(), grads)
    if reference is None:
        return ours
    (loss, aux, grads), (own_loss, own_aux, own_grads) = ours, reference
    _expect(bool(torch.isclose(loss, own_loss, rtol=1e-5, atol=1e-5)),
            f"loss {loss.item():.6f} != the model's own {own_loss.item():.6f}")
    _expect((aux is None) == (own_aux is None) and (aux is None or bool(torch.isclose(aux, own_aux, rtol=1e-5, atol=1e-6))),
            f"aux_loss {aux} != the model's own {own_aux}")
    _expect([g is None for g in grads] == [g is None for g in own_grads], "other parameters get a gradient")
    pairs = [(g.float(), own.float()) for g, own in zip(grads, own_grads) if own is not None]
    total = torch.cat([own.flatten() for _, own in pairs]).norm()
    error = torch.cat([(g - own).flatten() for g, own in pairs]).norm()
    _expect(bool(error <= 1e-5 * total), f"gradients differ by {(error / total).item():.2e} of their norm")
    worst = max(((g - own).norm() / (own.norm() + 1e-2 * total)).item() for g, own in pairs)
    _expect(worst <= 1e-4, f"a parameter's gradient differs by {worst:.2e} of its norm")


def _generation_check(model, reference):
    x = _tokens(12, model.config.get_text_config(decoder=True).vocab_size)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if reference is None:
        return out
    _expect(torch.equal(out, reference), f"greedy tokens differ: {out[0, 12:].tolist()} vs {reference[0, 12:].tolist()}")


def run_model_type(model_type: str) -> Row:
    """One row of the matrix."""
    row = Row(model_type)
    start = time.perf_counter()
    try:
        with _time_limit(TIMEOUT_S):
            model = build(model_type)
            begin = time.perf_counter()
            with torch.no_grad():  # transformers itself must run the longest input (absolute positions may not)
                model(_tokens(LONG, model.config.get_text_config(decoder=True).vocab_size))
            if time.perf_counter() - begin > SLOW_S:
                raise TimeoutError(f"transformers' own forward takes over {SLOW_S} s at tiny size on this CPU "
                                   "(a sequential fallback), too slow for the matrix's time budget")
    except Exception as err:  # noqa: BLE001  the tiny model itself does not build or run: no cell to fill
        row.built = f"{type(err).__name__}: {_one_line(err)}"
        row.seconds = time.perf_counter() - start
        return row
    unpatch_errors: list[str] = []
    checks = {
        "rope": lambda: _rope(model, unpatch_errors),
        "window": lambda: _section(model, {"attention": {"sliding_window": 4 * LENGTH}}, _logits_check(1e-4),
                                   unpatch_errors, "window"),
        "sinks": lambda: _section(model, {"attention": {"sliding_window": 4, "sink_tokens": 2}}, _logits_check(None),
                                  unpatch_errors, "sinks"),
        "loss": lambda: _section(model, {"loss": {"chunk_size": 8}}, _loss_check, unpatch_errors, "loss"),
        "streaming": lambda: _section(model, {"streaming": {"sink_tokens": 4, "window": 64}}, _generation_check,
                                      unpatch_errors, "streaming"),
        "moe": lambda: _section(model, {"moe": {"num_experts": 4, "top_k": 2}}, _logits_check(1e-5),
                                unpatch_errors, "moe"),
    }
    for name, check in checks.items():
        try:
            with _time_limit(TIMEOUT_S):
                row.cells[name] = check()
        except _Wrong as err:
            row.cells[name] = Cell("FAIL", _one_line(err))
        except Exception as err:  # noqa: BLE001  any other exception is a failure of the cell
            logger.debug("%s %s:\n%s", model_type, name, traceback.format_exc())
            row.cells[name] = Cell("FAIL", f"{type(err).__name__}: {_one_line(err)}")
    applied = any(cell.status == "pass" for cell in row.cells.values())
    if unpatch_errors:
        row.cells["unpatch"] = Cell("FAIL", "; ".join(unpatch_errors))
    else:
        row.cells["unpatch"] = Cell("pass") if applied else Cell("refused", "no section applies")
    row.seconds = time.perf_counter() - start
    return row


def model_types() -> list[str]:
    """Every causal-LM model type, then the real long-context rope configurations."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .testing import LONG_CONTEXT_CONFIGS

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + list(LONG_CONTEXT_CONFIGS)


def run_matrix(types: list[str] | None = None) -> list[Row]:
    """Every row, one thread (tiny matrices gain nothing from more)."""
    import transformers

    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    try:
        return [run_model_type(t) for t in tqdm(types or model_types(), desc="conformance matrix", disable=None)]
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def render(rows: list[Row]) -> str:
    """docs/families.md: one row per model type, one column per section."""
    import transformers

    from .testing import LONG_CONTEXT_CONFIGS

    real = [row for row in rows if row.model_type in LONG_CONTEXT_CONFIGS]
    rows_by_type = [row for row in rows if row.model_type not in LONG_CONTEXT_CONFIGS]
    passing = sum(row.passes for row in rows_by_type)
    failing = sum(bool(row.failures) for row in rows_by_type)
    lines = [
        "# Model families: conformance matrix",
        "",
        f"Generated by `python -m hf_longctx.conformance` (also run by `tests/test_family_matrix.py`) with "
        f"transformers {transformers.__version__} and torch {torch.__version__}: every causal-LM model type, built "
        f"tiny from its own config, each section checked against transformers' own oracle (see "
        "`hf_longctx/conformance.py` for what each column checks).",
        "",
        f"{len(rows_by_type)} model types: {passing} pass every section they do not refuse, {failing} with a failing "
        f"cell, {sum(bool(r.built) for r in rows_by_type)} whose tiny model does not build or run in transformers "
        "itself.",
        "",
        f"Below them, {len(real)} rows with the rope that long-context checkpoints ship (tiny widths, the checkpoint's "
        "real `rope_parameters` and context; `hf_longctx.testing.LONG_CONTEXT_CONFIGS`): their rope column stacks "
        "each rope type on the shipped scaling and checks the rotation against a from-scratch reference of the rule "
        f"at lengths up to {5 * STACKED_AT:,} tokens, then the save/reload and unpatch; "
        f"{sum(row.passes for row in real)} of them pass every section they do not refuse, "
        f"{sum(bool(row.failures) for row in real)} with a failing cell.",
        "",
        "| model type | " + " | ".join(SECTIONS) + " |",
        "|---|" + "---|" * len(SECTIONS),
    ]
    for row in rows:
        if row.built:
            cells = [f"not built: {row.built}"] + [""] * (len(SECTIONS) - 1)
        else:
            cells = [row.cells[name].render() if name in row.cells else "" for name in SECTIONS]
        lines.append(f"| {row.model_type} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[Row], path: str | Path = "docs/families.md") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hf_longctx.conformance",
        description="Check every section on tiny models of every causal-LM model type against transformers' own "
                    "oracles and write the table (docs/families.md).")
    parser.add_argument("model_types", nargs="*",
                        help="only these rows (model types or LONG_CONTEXT_CONFIGS names), printed rather than "
                             "written unless --output is given")
    parser.add_argument("--output", help="where to write the table (default for the whole matrix: "
                                         "docs/families.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = run_matrix(args.model_types or None)
    output = args.output or (None if args.model_types else "docs/families.md")
    if output is None:
        print(render(result))
    else:
        print(write_table(result, output))


if __name__ == "__main__":
    main()
