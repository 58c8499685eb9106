#!/usr/bin/env bash
# The engines' virtualenv for tests/test_serving_engines.py: vLLM 0.33.0 and SGLang 0.5.23 without their CUDA
# dependencies, beside this machine's CPU build of torch. Their imports need the packages in requirements.txt
# (found once: a pip freeze of a virtualenv where `vllm.model_executor.layers.rotary_embedding` and
# `sglang.srt.layers.rotary_embedding` imported; transformers 5.20.2 is the release both accept: vLLM 0.33 needs
# < 5.21, SGLang 0.5.23 pins 5.19 and runs its rope code on 5.20). torch is the machine's CPU build, as for the project.
#
#   bash tests/engines/setup.sh [VENV]        (default: .venv-engines)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv-engines}
torch_version=$(python3 -c 'import re; print(re.search(r"\"torch>=([0-9.]+)", open("pyproject.toml").read()).group(1))')
python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==$torch_version" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$venv/bin/pip" install -q -r tests/engines/requirements.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
"$venv/bin/pip" install -q --no-deps vllm==0.33.0 sglang==0.5.23 2>&1 | { grep -v "^WARNING: Location" || true; }
VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c '
from vllm.model_executor.layers.rotary_embedding import get_rope
from sglang.srt.layers.rotary_embedding import get_rope as sglang_get_rope
import vllm, sglang, transformers, torch
print("engines:", f"vllm {vllm.__version__}, sglang {sglang.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")' 2>&1 | grep -v "_C_AVX2"
