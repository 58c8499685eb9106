"""Run a GGUF file in llama.cpp (llama-cpp-python) on given tokens; save the logits of the last positions.

Runs in a virtualenv with llama-cpp-python (it builds llama.cpp from source); imports nothing of hf_longctx.

    python llama_cpp_logits.py MODEL.gguf TOKENS.npy LAST OUT.npy
"""

import sys
import time

import numpy as np
from llama_cpp import Llama

path, tokens_file, last, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tokens = np.load(tokens_file).tolist()
start = time.time()
llm = Llama(model_path=path, n_ctx=len(tokens) + 8, n_batch=512, logits_all=True, verbose=False, n_threads=2)
llm.eval(tokens)
scores = np.asarray(llm.scores[len(tokens) - last - 1:len(tokens) - 1], dtype=np.float32)
np.save(out, scores)
print(f"llama.cpp: {len(tokens)} tokens in {time.time() - start:.0f} s")
