"""Evaluation: perplexity vs context length, passkey retrieval, streaming perplexity, tables and plots."""

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
from .report import format_length, markdown_table, plot_lines, plot_passkey, write_json
from .streaming import parallel_streaming_check, streaming_nll, streaming_perplexity

__all__ = [
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
