"""SmolLM2-135M in llama.cpp against transformers: GGUF files written by hf_longctx, past the trained 8,192 tokens.

    python benchmarks/llama_cpp_agreement.py --llama-python PATH/bin/python [--tokens 12288] [--last 256]

``--llama-python``: a Python with llama-cpp-python (``pip install llama-cpp-python`` builds llama.cpp from source,
about 40 minutes on 2 cores). Rows, each on English text (the standard library's pydoc topics), comparing the
next-token predictions of llama.cpp with those of transformers over the last ``--last`` positions:

- ``unpatched Q4_1``: the shipped Q4_1 file against its float32 dequantization in transformers, 6,144 tokens
  (inside 8,192): what quantization alone costs, the baseline;
- ``yarn x2 (from the Q4_1 file)``: ``hf-longctx patch SmolLM2.Q4_1.gguf --spec yarn2.yaml --out x.gguf`` (quantized
  tensors kept, rope rewritten) against the patched float32 model, ``--tokens`` tokens;
- ``stacked (float folder)``: the model given a shipped ``llama3`` x2 rope (8,192 -> 16,384), then ``yarn`` x2 on top
  (stacked: saved as longrope), written from the float32 folder, ``--tokens`` tokens;
- ``stacked, converter (float folder)``: the same model saved with ``hl.save_pretrained`` and converted by llama.cpp's
  own ``convert_hf_to_gguf.py`` when ``--converter`` gives its path (it drops longrope factors on a Llama).

Agreement: the share of positions where both pick the same next token; the median absolute difference of the
log-probability each gives the token that follows in the text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hf_longctx as hl
from hf_longctx.real_demo import english_tokens, smollm2_converted, smollm2_gguf
from hf_longctx.serving.gguf import write_gguf
from hf_longctx.testing import cpu_name

HERE = Path(__file__).resolve().parent


def transformers_logits(model, tokens: torch.Tensor, last: int) -> np.ndarray:
    with torch.no_grad():
        hidden = model.model(tokens[None]).last_hidden_state[0, -last - 1:-1]
        return model.lm_head(hidden).float().numpy()


def llama_cpp_logits(python: str, gguf: Path, tokens: torch.Tensor, last: int, work: Path) -> np.ndarray:
    np.save(work / "tokens.npy", tokens.numpy().astype(np.int64))
    out = work / "scores.npy"
    done = subprocess.run([python, str(HERE / "engines" / "llama_cpp_logits.py"), str(gguf), str(work / "tokens.npy"),
                           str(last), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    print("   ", done.stdout.strip())
    return np.load(out)


def agreement(ours: np.ndarray, theirs: np.ndarray, targets: np.ndarray) -> dict:
    def logprobs(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    a, b = logprobs(ours.astype(np.float64)), logprobs(theirs.astype(np.float64))
    rows = np.arange(len(targets))
    return {"agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "median_logprob_diff": float(np.median(np.abs(a[rows, targets] - b[rows, targets])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--baseline-tokens", type=int, default=6144)
    parser.add_argument("--last", type=int, default=256)
    parser.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py, for the converter row")
    parser.add_argument("--out", default=str(HERE / "results" / "llama_cpp_agreement.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = smollm2_gguf()
    folder = smollm2_converted()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = english_tokens(tokenizer)
    results = {"machine": cpu_name(), "rows": {}}
    out = Path(args.out)

    def record(name, gguf_path, model, length):
        tokens = text[:length]
        start = time.time()
        ours = transformers_logits(model, tokens, args.last)
        print(f"    transformers: {length} tokens in {time.time() - start:.0f} s")
        with tempfile.TemporaryDirectory() as work:
            theirs = llama_cpp_logits(args.llama_python, gguf_path, tokens, args.last, Path(work))
        row = {"tokens": length, **agreement(ours, theirs, tokens[-args.last:].numpy())}
        results["rows"][name] = row
        print(f"{name}: {row}")
        out.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = hl.from_pretrained(folder).eval()
        record("unpatched Q4_1", source, model, args.baseline_tokens)

        hl.patch(model, {"rope": {"type": "yarn", "factor": 2}})
        written = write_gguf(model, tmp / "yarn2.gguf", source=source)
        record("yarn x2 (from the Q4_1 file)", written, model, args.tokens)

        stacked = hl.from_pretrained(folder).eval()
        shipped = tmp / "shipped-llama3x2"
        text_config = stacked.config
        text_config.rope_parameters = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                       "rope_theta": text_config.rope_parameters["rope_theta"]}
        text_config.max_position_embeddings = 16384
        stacked.save_pretrained(shipped)
        tokenizer.save_pretrained(shipped)
        stacked = hl.from_pretrained(shipped).eval()
        hl.patch(stacked, {"rope": {"type": "yarn", "factor": 2}})
        written = write_gguf(stacked, tmp / "stacked.gguf", tokenizer_gguf=source)
        record("stacked llama3 x2 + yarn x2 (float folder)", written, stacked, args.tokens)

        if args.converter:
            saved = tmp / "stacked-folder"
            hl.save_pretrained(stacked, saved)
            tokenizer.save_pretrained(saved)
            converted = tmp / "converted.gguf"
            done = subprocess.run([sys.executable, args.converter, str(saved), "--outfile", str(converted),
                                   "--outtype", "f32"], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"convert_hf_to_gguf.py failed, no converter row:\n{done.stderr[-2000:]}")
                return
            record("stacked, convert_hf_to_gguf.py (float folder)", converted, stacked, args.tokens)


if __name__ == "__main__":
    main()
