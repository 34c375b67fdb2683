#!/usr/bin/env bash
# The first (or any) session on a borrowed GPU, in one command (issue 11 item 6; docs/cuda.md,
# "First GPU session"). With the device tool, from the repository root:
#
#     run  command: bash bench/gpu_session.sh      timeout_s: 540
#
# It needs nothing carried: the machine's python3 has torch, torchvision, triton, numpy,
# safetensors, tqdm, scikit-learn, matplotlib and pillow; this checkout is installed there
# offline without dependencies (pip install --no-deps --no-build-isolation --no-index -e .);
# nvtx is missing there and unidd_fast runs without it (no NVTX ranges, and nsys is not on
# that machine anyway). To have it all the same, download its wheel here before the call and
# carry .whl (see /work/.library/device/README.md):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl nvtx==0.2.17
# and begin the command with
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#
# Steps (bench/gpu_session.py), each under its own time limit inside a 480 s budget, most
# valuable first: versions and API checks; the CUDA extension build (background); doctor
# ResNet-18 224 px b100 and ResNet-50 224 px b500 (torch, triton); doctor with the cuda
# backend; bench/run_all.py --quick. Results under $OUT: log.txt (all output), session.json,
# doctor_*.json, session.tar.gz (benchmark JSON, build log).
#
# Dry run on a machine without a GPU (CPU-sized settings, no extension build; $OUT defaults
# to a new temporary folder):
#     GPU_SESSION_DEVICE=cpu nice -n 19 bash bench/gpu_session.sh --budget 300
# Other arguments go to bench/gpu_session.py (--only STEPS, --budget S; see --help).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d /tmp/gpu_session_out.XXXXXX) || exit 2
fi
export OUT
mkdir -p "$OUT" || exit 2
PY=${GPU_SESSION_PYTHON:-python3}
[ -z "${GPU_SESSION_PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
"$PY" bench/gpu_session.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
