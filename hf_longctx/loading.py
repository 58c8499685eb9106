"""Where a checkpoint comes from: a local folder, a Hub repo id, or a GGUF file; loading and converting it.

One resolver serves the command line, :func:`hf_longctx.from_pretrained` and the fine-tuning
recipe, so they accept the same inputs and fail with the same one-line errors:

- a folder with ``config.json`` (transformers' format);
- a Hub repo id (``owner/name``);
- a GGUF file (``model.gguf``), or a folder or repo id plus ``gguf_file`` naming one inside it.

A GGUF checkpoint is dequantized by transformers (it needs the ``gguf`` package, the ``[gguf]``
extra) into a plain model of the dtype asked for; its tokenizer comes from the same file.
:func:`convert` writes any source as a transformers folder (safetensors), all at once:
the files go to a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; "./x" and "../x" are paths
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class LoadError(ValueError):
    """A checkpoint that cannot be found or loaded; the message is one line naming it."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved checkpoint: ``location`` is a local folder or a Hub repo id; ``gguf_file`` a file in it."""

    location: str
    gguf_file: str | None = None
    local: bool = True

    def __str__(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location

    def kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` of transformers needs besides ``location`` to read this source."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(name_or_path: str | Path, gguf_file: str | None = None) -> ModelSource:
    """Check that ``name_or_path`` (plus ``gguf_file``) names a checkpoint; raise :class:`LoadError` if not.

    Local paths are checked here; a Hub repo id is only checked for its form (``owner/name``).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"'{name}' is a file, not a model: give a model folder, a Hub repo id or a .gguf file")
        if gguf_file is not None:
            raise LoadError(f"'{name}' is already a GGUF file; gguf_file '{gguf_file}' names a file inside a folder or repo")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise LoadError(f"'{name}' has no file '{gguf_file}'")
            return ModelSource(str(path), gguf_file)
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {', '.join(found)}: name one with gguf_file (--gguf-file)" if found else ""
            raise LoadError(f"'{name}' is not a model folder: it has no config.json{hint}")
        return ModelSource(str(path))
    if name.endswith(".gguf"):
        raise LoadError(f"GGUF file '{name}' does not exist")
    if not REPO_ID.fullmatch(name):
        raise LoadError(f"model '{name}' is neither an existing folder nor a Hub repo id (owner/name)")
    return ModelSource(name, gguf_file, local=False)


def _gguf_errors(source: ModelSource, load: Callable[[], Any]) -> Any:
    """Run ``load``; a GGUF that transformers cannot read becomes one :class:`LoadError` naming the file."""
    try:
        return load()
    except (ImportError, ValueError) as err:
        if not source.gguf_file:
            raise
        if isinstance(err, ImportError):
            raise LoadError(f"reading '{source}' needs the gguf package: pip install 'hf-longctx[gguf]' ({err})") from err
        if "architecture" in str(err) and "not supported" in str(err):
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
            raise LoadError(
                f"'{source}': {err} transformers dequantizes GGUF files of these architectures: {', '.join(known)}"
            ) from err
        if "magic" in str(err).lower():
            raise LoadError(f"'{source}' is not a GGUF file ({err})") from err
        raise


def load_config(source: ModelSource, **kwargs: Any):
    """The source's transformers config (``kwargs``: ``revision``, ``token``, ``cache_dir``, ...)."""
    from transformers import AutoConfig

    config = _gguf_errors(source, lambda: AutoConfig.from_pretrained(source.location, **source.kwargs(), **kwargs))
    if source.gguf_file and source.local:
        from .serving.gguf import read_record

        record = read_record(Path(source.location) / source.gguf_file)
        if record:  # written by hf_longctx: the patch and the values it replaced (its rope is in rope_freqs)
            config.hf_longctx, config.hf_longctx_base = record["hf_longctx"], record["hf_longctx_base"]
    return config


def load_model(source: ModelSource, dtype: torch.dtype | str | None = None, **kwargs: Any):
    """The causal LM at ``source``; a GGUF is dequantized into plain ``dtype`` weights (default float32).

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``config``, ``revision``,
    ``attn_implementation``, ...). ``trust_remote_code`` is never enabled unless passed.
    """
    from transformers import AutoModelForCausalLM

    if source.gguf_file:
        try:
            from transformers import GgufConfig
        except ImportError:  # transformers before its GGUF quantizer always dequantizes
            pass
        else:  # unpack every block now: an ordinary model that patches, trains and saves
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        dtype = torch.float32 if dtype in (None, "auto") else dtype
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _gguf_errors(
        source, lambda: AutoModelForCausalLM.from_pretrained(source.location, **source.kwargs(), **kwargs)
    )


def load_tokenizer(source: ModelSource, **kwargs: Any):
    """The source's tokenizer, or ``None`` for a local folder that ships none (a GGUF always carries one)."""
    from transformers import AutoTokenizer

    folder = Path(source.location)
    if source.local and not source.gguf_file and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    return _gguf_errors(source, lambda: AutoTokenizer.from_pretrained(source.location, **source.kwargs(), **kwargs))


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a new temporary folder beside ``path``, then rename it to ``path``.

    An interrupted or failing ``write`` leaves ``path`` as it was (absent, or the previous
    complete folder) and removes the temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except BaseException:  # KeyboardInterrupt included: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def convert(source: ModelSource, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``source`` (a GGUF dequantized to ``dtype``) to the folder ``out``: safetensors, config, tokenizer."""
    model = load_model(source, dtype=dtype)
    tokenizer = load_tokenizer(source)
    logger.info("converting %s to %s (%s)", source, out, dtype)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return write_atomically(out, write)
