#!/usr/bin/env bash
# Sets up a fresh machine for this repository; safe to run again (it only does what is missing).
#   - Debian packages: SLURM + munge (the tests start a real local cluster) and Fashion-MNIST (the demo's data),
#     installed when running as root (or with passwordless sudo) and missing.
#   - A virtual environment in .venv with requirements.txt, reinstalled only when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(slurmctld slurmd slurm-client munge dataset-fashion-mnist)
missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
fi
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] not root: skipping Debian packages ${missing[*]} (SLURM tests and the packaged Fashion-MNIST need them)"
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[setup] installing requirements.txt into .venv (first time: a few minutes, torch is large)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, timm, deepspeed; print(f"torch {torch.__version__}, timm {timm.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null)"
