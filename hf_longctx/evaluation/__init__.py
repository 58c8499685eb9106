"""Evaluation: perplexity vs context length, passkey retrieval, streaming perplexity, tables and plots."""

from .passkey import PasskeyPoint, greedy_matches, min_passkey_length, passkey_accuracy, passkey_keys, passkey_prompt
from .perplexity import PerplexityPoint, perplexity_vs_length, score_last_tokens, window_ends
from .report import format_length, markdown_table, plot_lines, plot_passkey, write_json
from .streaming import streaming_perplexity

__all__ = [
    "PasskeyPoint",
    "PerplexityPoint",
    "format_length",
    "greedy_matches",
    "markdown_table",
    "min_passkey_length",
    "passkey_accuracy",
    "passkey_keys",
    "passkey_prompt",
    "perplexity_vs_length",
    "plot_lines",
    "plot_passkey",
    "score_last_tokens",
    "streaming_perplexity",
    "window_ends",
    "write_json",
]
