#!/usr/bin/env bash
# Installs the test extras: the reference implementation (diffusers, transformers),
# the original CLIP tokenizer and k-diffusion (without their torchvision dependency,
# so pip never swaps the CPU torch build), and the browser for UI tests.
set -euo pipefail
BIN=${1:-.venv/bin}
"$BIN/pip" install --quiet -e '.[server,test]'
"$BIN/pip" install --quiet --no-deps k-diffusion==0.1.1.post1 clip-anytorch==2.6.0
