#!/usr/bin/env bash
# The GPU checklist of the team's GPU notes, in parts that each fit one device call (10 minutes a command).
#
#   bash benchmarks/gpu_checklist.sh tests     # pytest -m cuda                                     (~5 min)
#   bash benchmarks/gpu_checklist.sh train     # CIFAR-10 U-Net throughput vs diffusers, bf16, +/- compile
#   bash benchmarks/gpu_checklist.sh sample    # DDPM-1000 and the fast samplers, batch 256 and 1024
#   bash benchmarks/gpu_checklist.sh fit       # configs/digits.yaml end to end on CUDA, then a resume
#   bash benchmarks/gpu_checklist.sh all       # everything in turn (longer than one device call allows)
#
# The GPU machines have no network and no jsonargparse / torch-fidelity / diffusers: copy the ready-made
# wheels into a git-ignored .whl/ (cp ../shared/device-wheels/*.whl .whl/) and name .whl in the call's
# carry; this script installs them into /tmp/site. Logs, JSON and a summary go under $OUT (the device
# tool's folder that comes back), else ./gpu-results. Every part prints the versions first and a table last.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi

versions() {
    python3 -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__,
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee -a "$OUT/versions.txt"
}

# step NAME SECONDS COMMAND...: run with a time limit, keep the whole log, show its tail
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    tail -n 20 "$OUT/$name.log"
}

tests() {
    step cuda_tests 540 python3 -m pytest -m cuda -q -p no:cacheprovider -rs --durations=10 tests/integration/test_cuda.py
}

train() {
    # batch 128, bf16-mixed: ours through Trainer.fit vs diffusers' UNet2DModel in a plain loop, same process
    step train_eager 240 python3 -m benchmarks.train_throughput --accelerator cuda --precision bf16-mixed \
        --batch-size 128 --steps 20 --warmup 5 --rounds 3 --out "$OUT/train_eager.json"
    step train_compile 330 python3 -m benchmarks.train_throughput --accelerator cuda --precision bf16-mixed \
        --batch-size 128 --steps 20 --warmup 5 --rounds 3 --compile --out "$OUT/train_compile.json"
}

sample() {
    step sampling 540 python3 -m benchmarks.sampling --model cifar --accelerator cuda --batch-size 256 1024 \
        --precision bf16 fp32 --samplers ddim:10 ddim:20 ddim:50 dpmpp_2m:10 dpmpp_2m:20 unipc:10 heun:10 ddpm \
        --out "$OUT/sampling.json"
}

fit() {
    # the config's own outputs (outputs/digits, in the machine's copy of the repository): EMA, sample grids,
    # checkpoints every 500 steps; then the run is resumed from its last checkpoint for 500 more steps
    step fit_digits 360 python3 -m lightning_ddpm fit --config configs/digits.yaml --trainer.accelerator=cuda \
        --trainer.precision=bf16-mixed
    step resume_digits 180 python3 -m lightning_ddpm fit --config configs/digits.yaml --trainer.accelerator=cuda \
        --trainer.precision=bf16-mixed --trainer.max_steps=2500 --ckpt_path=outputs/digits/checkpoints/last.ckpt
    cp outputs/digits/samples/*.png "$OUT/" 2>/dev/null
    python3 - <<'PY'
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for path in sorted(glob.glob("outputs/digits/lightning_logs/version_*")):
    events = EventAccumulator(path)
    events.Reload()
    if "val/loss" in events.Tags()["scalars"]:
        print(path, [(e.step, round(e.value, 5)) for e in events.Scalars("val/loss")])
PY
}

versions
case "${1:-all}" in
    tests) tests ;;
    train) train ;;
    sample) sample ;;
    fit) fit ;;
    all) tests; train; sample; fit ;;
    *) echo "unknown part ${1}: tests, train, sample, fit or all" >&2; exit 2 ;;
esac
cat "$OUT/summary.txt"
