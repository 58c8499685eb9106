"""Evaluation: perplexity vs context length, passkey retrieval, streaming perplexity, plots."""
