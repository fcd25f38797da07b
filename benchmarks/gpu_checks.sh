#!/usr/bin/env bash
# Issue 21's GPU checks as one run on the device machine (read /work/.library/device/README.md first). Here, once:
#   bash benchmarks/gpu_wheels.sh            # the wheels its python3 lacks, into .whl (git-ignored)
# then one call of the device tool's run: carry [".whl"], timeout_s 420, command
#   bash benchmarks/gpu_checks.sh            # the steps' own limits add up to 330 s; a failed step stops no other
# Output under $OUT (8 files at most come back):
#   pytest.txt        on the GPU machine: the CPU-vs-GPU agreement test, the precision and device-selection tests
#   vs_breaching.json GGI ResNet-50 / 224 px / batch 8, fl-sim and breaching on the same GPU, 2 cases (s/iteration)
#   batched.json      K = 8 clients of one round batched vs one by one (ResNet-50 / 224 px / batch 8)
#   precision.json    fp32 / tf32 / bf16 autocast: s/iteration and quality at an equal budget
#   auto.txt          a federation with device = "auto": run.json's server_device
#   gpu.txt, log.txt  the machine; each step's status and stderr
# Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
log="$out/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 || { echo "gpu_checks: installing .whl failed (see log.txt)"; exit 99; }
export PYTHONPATH="/tmp/site:$PWD" OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 FL_SIM_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >"$out/gpu.txt" 2>>"$log"
failed=0
step() {  # step NAME SECONDS FILE COMMAND...: one check, stdout to FILE, stderr and its status to log.txt
    local name=$1 limit=$2 file=$3 start=$SECONDS status
    shift 3
    echo "== $name (limit ${limit} s): $*" | tee -a "$log"
    timeout "$limit" "$@" >"$out/$file" 2>>"$log"
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}
step pytest 60 pytest.txt python3 -m pytest -q -p no:cacheprovider tests/test_attacks.py::test_cpu_and_gpu_agree \
    tests/test_precision.py tests/test_scenario.py -k "agree or precision or tf32 or bf16 or device"
step vs_breaching 90 vs_breaching.json python3 benchmarks/vs_breaching.py --device cuda --attacks ggi-r50-224 \
    --cases 2 --iterations 50 --worker-python python3
step batched 60 batched.json python3 benchmarks/batched_attacks.py --device cuda --settings ggi/resnet50-224 \
    --ks 8 --iterations 20 --no-compile
step precision 60 precision.json python3 benchmarks/precision.py --device cuda --iterations 50
step auto 60 auto.txt bash -c "python3 -m fl_sim.cli run scenarios/quickstart.toml --set device=auto \
    --set federation.rounds=2 --set 'threat_model.rounds=[1]' --out /tmp/auto-run >&2 && python3 -c \
    \"import json; print('server_device:', json.load(open('/tmp/auto-run/run.json'))['server_device'])\""
echo "gpu_checks: $failed step(s) failed" | tee -a "$log"
exit "$failed"
