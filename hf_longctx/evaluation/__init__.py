"""Evaluation: perplexity vs context length, passkey retrieval, needle heatmap, streaming perplexity,
lm-evaluation-harness on a patched model, tables and plots."""

from .harness import harness_model, ruler_metadata
from .harness import evaluate as harness_evaluate
from .needle import NeedleCell, effective_length, needle_grid, reach
from .passkey import (
    PasskeyPoint,
    first_number,
    greedy_continuation,
    min_passkey_length,
    passkey_accuracy,
    passkey_keys,
    passkey_prompt,
)
from .perplexity import PerplexityPoint, perplexity_vs_length, score_last_tokens, window_ends
from .report import format_length, markdown_table, plot_lines, plot_needle, plot_passkey, write_json
from .streaming import parallel_streaming_check, streaming_nll, streaming_perplexity

__all__ = [
    "NeedleCell",
    "effective_length",
    "harness_evaluate",
    "harness_model",
    "needle_grid",
    "plot_needle",
    "reach",
    "ruler_metadata",
    "PasskeyPoint",
    "PerplexityPoint",
    "format_length",
    "first_number",
    "greedy_continuation",
    "markdown_table",
    "min_passkey_length",
    "passkey_accuracy",
    "passkey_keys",
    "passkey_prompt",
    "perplexity_vs_length",
    "plot_lines",
    "parallel_streaming_check",
    "plot_passkey",
    "score_last_tokens",
    "streaming_nll",
    "streaming_perplexity",
    "window_ends",
    "write_json",
]
