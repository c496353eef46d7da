#!/usr/bin/env bash
# Installs the test extras (Ray included, for the batch scale-out test): the reference implementation (diffusers, transformers),
# the original CLIP tokenizer and k-diffusion (without their torchvision dependency,
# so pip never swaps the CPU torch build), and the browser for UI tests.
set -euo pipefail
BIN=${1:-.venv/bin}
"$BIN/pip" install --quiet -e '.[server,test,watermark]'
"$BIN/pip" install --quiet --no-deps k-diffusion==0.1.1.post1 clip-anytorch==2.6.0
# The invisible watermark without its opencv-python (GUI) requirement: the watermark extra
# above brings opencv-python-headless and PyWavelets instead.
"$BIN/pip" install --quiet --no-deps invisible-watermark==0.2.0

# The compiled attention kernel's tests need a C++ compiler (Debian's g++).
if ! command -v g++ >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        echo "setup-test: not root, g++ not installed; the compiled kernel's tests will be skipped" >&2
    fi
fi
"$BIN/python" -m sdgen.runtime.kernels

# Browser tests of the web UI: Debian's chromium (never a downloaded browser build) and
# playwright-core, pinned by tests/browser/package-lock.json.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup-test: not root, chromium not installed; the browser tests will be skipped" >&2
    fi
fi
if command -v npm >/dev/null && [ ! -d tests/browser/node_modules/playwright-core ]; then
    npm ci --prefix tests/browser --no-audit --no-fund --silent
fi
