"""lm-evaluation-harness on a patched model: lm-eval's own task code and scoring.

:func:`harness_model` wraps any model (patched or not) as lm-eval's ``HFLM``, with ``max_length``
set to the method's extended length: left alone, ``HFLM`` takes ``max_position_embeddings`` (or
2048) and cuts longer prompts from the left, so a long-context evaluation would silently read only
the last part of every prompt. :func:`ruler_metadata` fills what RULER's tasks read from the task
metadata (a tokenizer path, to size their prompts, and ``max_seq_lengths``), which lm-eval fills in
only when it loads the model itself from a name.

RULER's tasks that build their samples locally (:data:`OFFLINE_TASKS`) need nothing from the
network; :func:`check_tasks` refuses the tasks known to download data, naming what they would fetch.
Needs the ``[eval]`` extra (``lm-eval``, and ``nltk`` and ``wonderwords`` for RULER).

lm-eval's RULER module asks nltk for its ``punkt_tab`` sentence splitter when it is imported and
downloads it when missing. Only the essay haystack (a task that downloads anyway) splits sentences;
while the offline tasks are loaded, that download is skipped (:func:`_no_nltk_download`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from torch import nn

logger = logging.getLogger(__name__)

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ALIASES = {"vt": "ruler_vt", "cwe": "ruler_cwe", "fwe": "ruler_fwe"}
ESSAYS = "the Paul Graham essays (Hugging Face dataset baber/paul_graham_essays) for its haystack"
NETWORK_TASKS = {
    "niah_single_2": ESSAYS,
    "niah_single_3": ESSAYS,
    "niah_multikey_1": ESSAYS,
    "niah_multivalue": ESSAYS,
    "niah_multiquery": ESSAYS,
    "ruler_qa_squad": "SQuAD v2 (rajpurkar.github.io) for its questions and documents",
    "ruler_qa_hotpot": "HotpotQA (curtis.ml.cmu.edu) for its questions and documents",
    "ruler": "the essays, SQuAD and HotpotQA: the group holds every RULER task",
}
GROUPS_THAT_DOWNLOAD = ("babilong", "longbench", "longbench2", "infinitebench")  # Hugging Face datasets
RULER_LENGTHS = tuple(4096 * 2**k for k in range(6))  # the lengths RULER's tasks have a metric for (4k to 128k)
NEEDS = "pip install 'hf-longctx[eval]' (lm-eval 0.4.13 with nltk and wonderwords for RULER)"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--harness needs lm-evaluation-harness: {NEEDS} ({err})") from err
    return lm_eval


def check_tasks(names: Sequence[str]) -> list[str]:
    """lm-eval task names (``vt``, ``cwe``, ``fwe`` taken as RULER's), or ``ValueError`` in one line for an
    unknown task or one that needs the network (naming it and what it would download)."""
    names = [ALIASES.get(n, n) for n in names]
    if not names:
        raise ValueError("--harness names no task")
    for name in names:
        if name in NETWORK_TASKS:
            raise ValueError(f"harness task '{name}' needs the network: it downloads {NETWORK_TASKS[name]}; "
                             f"offline RULER tasks: {', '.join(OFFLINE_TASKS)}")  # fmt: skip
        group = next((g for g in GROUPS_THAT_DOWNLOAD if name == g or name.startswith(g + "_")), None)
        if group:
            raise ValueError(f"harness task '{name}' needs the network: it downloads the {group} dataset from the "
                             f"Hugging Face Hub; offline RULER tasks: {', '.join(OFFLINE_TASKS)}")  # fmt: skip
    others = [n for n in names if n not in OFFLINE_TASKS]
    _lm_eval()
    if others:  # lm-eval's whole task index (some seconds); RULER's offline tasks are known without it
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [n for n in others if n not in known]
        if unknown:
            raise ValueError(f"unknown harness task '{unknown[0]}' (lm-eval has no such task); offline RULER tasks: "
                             f"{', '.join(OFFLINE_TASKS)}")  # fmt: skip
    for name in names:
        if name not in OFFLINE_TASKS:
            logger.warning("harness task %s is not one of the offline RULER tasks; it may need the network", name)
    return names


def check_lengths(tasks: Sequence[str], lengths: Sequence[int]) -> None:
    """``ValueError`` in one line for a length RULER scores nothing at (its metrics are 4k, 8k, ..., 128k)."""
    ruler = [t for t in tasks if t in OFFLINE_TASKS or t in NETWORK_TASKS]
    bad = [n for n in lengths if n not in RULER_LENGTHS]
    if ruler and bad:
        raise ValueError(f"RULER task '{ruler[0]}' scores only the lengths {', '.join(map(str, RULER_LENGTHS))}; "
                         f"--lengths asks for {bad[0]}")  # fmt: skip


def extended_length(model: nn.Module) -> int:
    """The length a patched model is meant to read: its reach, else ``max_position_embeddings``."""
    from .needle import reach

    limit, _ = reach(model)
    return int(limit or model.config.get_text_config(decoder=True).max_position_embeddings)


def harness_model(model: nn.Module, tokenizer: Any, max_length: int | None = None, batch_size: int = 1, **kwargs: Any):
    """``lm_eval.models.huggingface.HFLM`` around ``model`` (patched or not) with ``max_length`` set.

    ``max_length`` defaults to :func:`extended_length`; prompts longer than it (minus the generated
    tokens) are cut from the left by lm-eval, so set it at least to the longest prompt.
    """
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    length = int(max_length) if max_length is not None else extended_length(model)
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=length, batch_size=batch_size, **kwargs)


def ruler_metadata(tokenizer_path: str, lengths: Sequence[int]) -> dict[str, Any]:
    """The task metadata RULER reads: the tokenizer (a local folder) and the sample lengths."""
    return {"tokenizer": str(tokenizer_path), "max_seq_lengths": [int(n) for n in lengths]}


@contextlib.contextmanager
def _no_nltk_download():
    """Skip nltk downloads (see the module) for the duration; restores ``nltk.download`` after.

    lm-eval's RULER module is imported here (once per process), so that its import-time download and the
    line it prints after it ("Downloaded punkt_tab", even when nothing was downloaded) happen in here.
    """
    try:
        import nltk
    except ImportError:
        yield
        return
    original = nltk.download
    asked = []

    def skipped(info_or_id=None, *args, **kwargs):
        asked.append(info_or_id)
        return False

    nltk.download = skipped
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import lm_eval.tasks.ruler.prepare_niah  # noqa: F401
        if asked:
            logger.info("nltk download of %s skipped: the offline RULER tasks do not use it", asked)
        yield
    finally:
        nltk.download = original


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    *,
    tokenizer_path: str,
    limit: int | None = None,
    max_length: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``model`` for ``tasks``, RULER samples of each length in ``lengths``.

    Returns lm-eval's results dict. ``max_length``: default the larger of :func:`extended_length` and the
    longest length plus 256 generated tokens, so that lm-eval cuts nothing.
    """
    _lm_eval()
    from lm_eval import simple_evaluate

    tasks = check_tasks(tasks)
    check_lengths(tasks, lengths)
    if max_length is None:
        max_length = max(extended_length(model), max(lengths) + 256)
    lm = harness_model(model, tokenizer, max_length=max_length)
    with _no_nltk_download():
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=False,
                               task_manager=task_manager(tasks, ruler_metadata(tokenizer_path, lengths)), **kwargs)


def task_manager(tasks: Sequence[str], metadata: dict[str, Any]):
    """lm-eval's ``TaskManager`` with ``metadata``; for RULER's offline tasks it indexes only RULER's folder
    (the same task files, without reading the thousands of others)."""
    from lm_eval.tasks import TaskManager

    if all(t in OFFLINE_TASKS for t in tasks):
        import lm_eval.tasks.ruler as ruler

        folder = Path(ruler.__file__).parent if getattr(ruler, "__file__", None) else Path(list(ruler.__path__)[0])
        return TaskManager(include_path=str(folder), include_defaults=False, metadata=metadata)
    return TaskManager(metadata=metadata)


def task_score(results: dict[str, Any], task: str, length: int) -> float:
    """A RULER task's score (0-100) at ``length`` from lm-eval's results (its metric is named by the length)."""
    metrics = results["results"][task]
    for key, value in metrics.items():
        if key.split(",")[0] == str(length) and isinstance(value, (int, float)):
            return float(value)
    raise KeyError(f"lm-eval's results for {task} have no metric for length {length}: {sorted(metrics)}")


def harness_scores(model: nn.Module, tokenizer: Any, task: str, length: int, *, limit: int | None,
                   tokenizer_path: str) -> dict[str, Any]:  # fmt: skip
    """One task at one length: ``{"score": lm-eval's score (RULER: 0-1) or None, "samples": n}`` (None when lm-eval gave -1: no sample)."""
    results = evaluate(model, tokenizer, [task], [length], tokenizer_path=tokenizer_path, limit=limit)
    score = task_score(results, task, length)
    samples = results.get("n-samples", {}).get(task, {}).get("effective")
    return {"score": None if score < 0 or math.isnan(score) else score, "samples": samples}
