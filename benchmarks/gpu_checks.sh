#!/usr/bin/env bash
# Issue 21's GPU checks as one run on the device machine (read /work/.library/device/README.md first). Here, once:
#   bash benchmarks/gpu_wheels.sh            # the wheels its python3 lacks, into .whl (git-ignored)
# then the device tool's run with carry [".whl"] and the command
#   bash benchmarks/gpu_checks.sh            # about 5 minutes; timeout_s 540 leaves a rerun
# Each check has its own time limit and its output file under $OUT (at most 8 come back):
#   pytest.txt        the CPU-vs-GPU agreement test, the precision and device-selection tests, on CUDA
#   vs_breaching.json GGI ResNet-50 / 224 px / batch 8, fl-sim and breaching on the same GPU, 2 cases (s/iteration)
#   batched.json      K = 8 clients of one round batched vs one by one (ResNet-50 / 224 px / batch 8)
#   precision.json    fp32 / tf32 / bf16 autocast: s/iteration and quality at an equal budget
#   auto.txt          a federation with device = "auto": run.json's server_device
#   gpu.txt, log.txt  the machine, and everything the checks printed
set -uo pipefail
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 FL_SIM_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$out/gpu.txt"
step() {  # step NAME SECONDS COMMAND...: one check, its status logged, the next one runs whatever happened
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s): $*" >&2
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - start)) s" >&2
}
step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/test_attacks.py::test_cpu_and_gpu_agree \
    tests/test_precision.py tests/test_scenario.py -k "agree or precision or tf32 or bf16 or device" \
    > "$out/pytest.txt"
step vs_breaching 150 python3 benchmarks/vs_breaching.py --device cuda --attacks ggi-r50-224 --cases 2 \
    --iterations 50 --worker-python python3 > "$out/vs_breaching.json"
step batched 120 python3 benchmarks/batched_attacks.py --device cuda --settings ggi/resnet50-224 --ks 8 \
    --iterations 20 --no-compile > "$out/batched.json"
step precision 90 python3 benchmarks/precision.py --device cuda --iterations 50 > "$out/precision.json"
step auto 90 python3 -m fl_sim.cli run scenarios/quickstart.toml --set device=auto --set federation.rounds=2 \
    --out /tmp/auto-run
python3 -c "import json; print('server_device:', json.load(open('/tmp/auto-run/run.json')).get('server_device'))" \
    | tee "$out/auto.txt"
