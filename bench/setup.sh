#!/usr/bin/env bash
# Bench-only dependencies, kept out of sdgen's runtime and test extras:
#   openvino   the OpenVINO peer (the reference U-Net converted with openvino.convert_model)
#   sd-cli     stable-diffusion.cpp's CLI, built by bench/sdcpp.py from the stable-diffusion-cpp-python
#              source package (pip download, unpacked and built under ~/.cache/sdgen-bench/, never in the
#              repo) with cmake (pip-installed when missing) and the system C++ compiler, niced.
# Usage: bash bench/setup.sh [.venv/bin]   (after `make setup-test`)
#   SDCPP_JOBS=2 to compile on both cores (default 1: the machine is usually shared); SDCPP=0 to skip it.
set -euo pipefail
BIN=${1:-.venv/bin}
"$BIN/pip" install --quiet "openvino==2026.4.1"
if [ "${SDCPP:-1}" != 0 ]; then
    command -v cmake >/dev/null || [ -x "$BIN/cmake" ] || "$BIN/pip" install --quiet "cmake>=3.14"
    "$BIN/python" "$(dirname "$0")/sdcpp.py" build --jobs "${SDCPP_JOBS:-1}"
fi
