"""Training data: load documents with ``datasets``, tokenize, pack into fixed-length sequences.

Packing (as Axolotl and LLaMA-Factory do) concatenates documents into sequences of exactly
``context_length`` tokens with no padding. Each document keeps its own positions: the
``position_ids`` restart at 0 where a document starts, and the batch carries no
``attention_mask``. From such positions transformers' masking
(``masking_utils.find_packed_sequence_indices``) builds a block-diagonal causal mask for the
eager and sdpa attention implementations, so no token attends across documents and every
document sees exactly what it would see alone. The first token of each document gets no
label: it would be predicted from the previous document. A document longer than the
remaining room is cut, and its rest starts the next sequence at position 0 again.

Without packing (``packing=False``, what context parallelism needs: its attention is causal over
the whole sequence, with no document mask) every sequence is ``context_length`` consecutive
tokens of one document, positions from 0; documents shorter than that, and the remainder of
longer ones, are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, load_dataset

from .loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` builder that reads it.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def load_documents(source: str, *, config: str | None = None, split: str = "train") -> Dataset:
    """A local file, a folder of files of one kind, or a Hub dataset name -> a ``Dataset`` of documents."""
    path = Path(source)
    if not path.exists():
        return load_dataset(source, config, split=split)
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise ValueError(
            f"dataset '{source}' must be one file, or a folder of files of one kind, with suffix "
            f"{', '.join(LOCAL_BUILDERS)}; found {', '.join(p.name for p in files) or 'no such file'}"
        )
    return load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def pack_documents(documents: Iterable[list[int]], context_length: int,
                   packing: bool = True) -> Iterator[dict[str, list[int]]]:
    """Pack token lists into sequences of ``context_length`` tokens (one document per sequence without ``packing``).

    Yields ``{"input_ids", "position_ids", "labels"}``, each a list of ``context_length`` ints:
    ``position_ids`` count from 0 within each document (piece), ``labels`` equal ``input_ids``
    except ``IGNORE_INDEX`` at each document's first token. The last, incomplete sequence is
    dropped.
    """
    if not packing:
        dropped = 0
        for document in documents:
            document = list(document)
            whole = len(document) // context_length * context_length
            dropped += len(document) - whole
            for start in range(0, whole, context_length):
                ids = document[start : start + context_length]
                yield {"input_ids": ids, "position_ids": list(range(context_length)), "labels": [IGNORE_INDEX, *ids[1:]]}
        logger.info("without packing, %d tokens of documents or remainders shorter than %d were dropped", dropped,
                    context_length)
        return
    ids: list[int] = []
    positions: list[int] = []
    for document in documents:
        document = list(document)
        while document:
            room = context_length - len(ids)
            piece, document = document[:room], document[room:]
            ids += piece
            positions += range(len(piece))
            if len(ids) == context_length:
                labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, positions)]
                yield {"input_ids": ids, "position_ids": positions, "labels": labels}
                ids, positions = [], []
    if ids:
        logger.info("packing dropped the last %d tokens (less than one sequence of %d)", len(ids), context_length)


def tokenize_documents(documents: Dataset, tokenizer, text_column: str = "text", add_eos: bool = True) -> Dataset:
    """Add an ``input_ids`` column (one list per document, EOS appended if ``add_eos``) and drop the rest."""
    if text_column not in documents.column_names:
        raise ValueError(f"text column '{text_column}' not in the dataset; columns: {', '.join(documents.column_names)}")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch[text_column])["input_ids"]]}

    return documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenizing")


def _packed_rows(tokenized: Dataset, context_length: int, packing: bool = True) -> Iterator[dict[str, list[int]]]:
    yield from pack_documents((row["input_ids"] for row in tokenized), context_length, packing)


def packed_dataset(tokenized: Dataset, context_length: int, packing: bool = True) -> Dataset:
    """The packed training set (see :func:`pack_documents`) of a tokenized dataset."""
    packed = Dataset.from_generator(
        _packed_rows, gen_kwargs={"tokenized": tokenized, "context_length": context_length, "packing": packing}
    )
    logger.info("packed %d documents into %d sequences of %d tokens", len(tokenized), len(packed), context_length)
    if len(packed) == 0:
        raise ValueError(
            f"the dataset holds fewer than context_length={context_length} tokens: nothing to train on"
        )
    return packed
