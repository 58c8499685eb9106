"""What the inference engines users serve with read from a saved checkpoint (vLLM, SGLang, llama.cpp), and
GGUF output for llama.cpp."""

from .engines import AS_SAVED, DIFFERENTLY, ENGINES, NOT_SERVED, UNVERIFIED, Row, serving_rows, serving_table

__all__ = ["AS_SAVED", "DIFFERENTLY", "ENGINES", "NOT_SERVED", "UNVERIFIED", "Row", "serving_rows", "serving_table"]
