#!/usr/bin/env bash
# Bench-only dependencies, kept out of sdgen's runtime and test extras:
#   openvino   the OpenVINO peer (the reference U-Net converted with openvino.convert_model)
# stable-diffusion.cpp is built on demand by `bench/run.py --peers sdcpp` in a temporary
# folder from the stable-diffusion-cpp-python source package (needs cmake and a C++ compiler).
# Usage: bash bench/setup.sh [.venv/bin]   (after `make setup-test`)
set -euo pipefail
BIN=${1:-.venv/bin}
"$BIN/pip" install --quiet "openvino==2026.4.1"
