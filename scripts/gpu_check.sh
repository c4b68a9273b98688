#!/usr/bin/env bash
# The GPU path in one prepared run: a training step (AMP, channels_last), `painwatch loio` on the demo
# set for a few folds, the Predictor's certificate (engine, precision, noise survival) and the latency
# benchmark, each timed; the figures go under $OUT (results/latency/gpu by default).
#
#   bash scripts/gpu_check.sh                          # on a machine with a CUDA GPU
#   DEVICE=cpu bash scripts/gpu_check.sh               # the same steps, reduced, on the CPU
#
# Settings (environment): DEVICE (cuda), OUT, WORK (scratch folder, removed at the end unless KEEP=1),
# ARCH / INPUT_SIZE (the clinical ResNet50 at 224 px on a GPU; resnet10t at 64 px for DEVICE=cpu),
# FOLDS (LOIO folds, 2), EPOCHS (1), PYTHON (python). Every step's output goes to $OUT/<step>.log (the
# logs name scratch paths: keep them out of commits); the script stops at the first failing step and
# says which.
set -euo pipefail

DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-results/latency/gpu}"
FOLDS="${FOLDS:-2}"
EPOCHS="${EPOCHS:-1}"
if [ "$DEVICE" = "cpu" ]; then
    ARCH="${ARCH:-resnet10t}"; INPUT_SIZE="${INPUT_SIZE:-64}"; INDIVIDUALS="${INDIVIDUALS:-4}"
    FRAMES_PER_CLASS="${FRAMES_PER_CLASS:-6}"; BENCH=(--frames 1 --answers 3 --random-inputs 8 --repeats 2)
else
    ARCH="${ARCH:-resnet50}"; INPUT_SIZE="${INPUT_SIZE:-224}"; INDIVIDUALS="${INDIVIDUALS:-21}"
    FRAMES_PER_CLASS="${FRAMES_PER_CLASS:-20}"; BENCH=(--frames 5 --batch 256)
fi
WORK="${WORK:-$(mktemp -d -t painwatch-gpu-check.XXXXXX)}"
export HF_HUB_OFFLINE=1
mkdir -p "$OUT" "$WORK"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

step() {  # step NAME COMMAND...: run, log, time; stop the script on failure
    local name=$1; shift
    local began=$SECONDS
    echo "== $name: $*"
    if ! "$@" >"$OUT/$name.log" 2>&1; then
        echo "FAILED: $name (see $OUT/$name.log)"; tail -20 "$OUT/$name.log"; exit 1
    fi
    echo "$name $((SECONDS - began)) s" | tee -a "$OUT/steps.txt"
}

: >"$OUT/steps.txt"
step environment "$PYTHON" -c "
import json, platform, torch
from painwatch.inference.engine import bf16_supported, choose_engine
device = torch.device('$DEVICE')
info = {'device': '$DEVICE', 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'cuda_available': torch.cuda.is_available(), 'platform': platform.platform(),
        'bf16': bf16_supported(device), 'engine': choose_engine(device)}
if device.type == 'cuda':
    info['gpu'] = torch.cuda.get_device_name(device)
json.dump(info, open('$OUT/environment.json', 'w'), indent=2)
print(info)
"
step demo-data "$PYTHON" -m painwatch demo-data "$WORK/demo" --individuals "$INDIVIDUALS" \
    --frames-per-class "$FRAMES_PER_CLASS"
step train "$PYTHON" -m painwatch train "$WORK/demo" --out "$WORK/bundle" --arch "$ARCH" \
    --input-size "$INPUT_SIZE" --epochs "$EPOCHS" --device "$DEVICE" --quiet
step loio "$PYTHON" -m painwatch loio "$WORK/demo" --out "$WORK/loio" --arch "$ARCH" --input-size "$INPUT_SIZE" \
    --epochs "$EPOCHS" --max-folds "$FOLDS" --device "$DEVICE" --quiet
# --max-folds leaves the run unfinished (no pooled metrics.json yet): summarise every finished fold.
step loio-folds "$PYTHON" -c "
import json, pathlib
keys = ('fold', 'test_individual', 'test_accuracy', 'temperature', 'epochs_run', 'num_train_frames')
folds = [json.loads(p.read_text()) for p in sorted(pathlib.Path('$WORK/loio/folds').glob('*/result.json'))]
summary = [{key: fold.get(key) for key in keys} for fold in folds]
assert summary, 'no LOIO fold finished'
json.dump(summary, open('$OUT/loio-folds.json', 'w'), indent=2)
print(summary)
"
step predictor "$PYTHON" -c "
import json, time
import numpy as np
from painwatch.data import read_image
from painwatch.inference import Predictor
predictor = Predictor.load('$WORK/bundle', seed=0, device='$DEVICE')
frames = sorted(p for p in __import__('pathlib').Path('$WORK/demo').rglob('*.jpg'))[:2]
images = [read_image(p) for p in frames]
began = time.perf_counter()
answers = predictor.answer(images)
answered = time.perf_counter() - began
results = predictor.predict(images, names=[p.name for p in frames])
again = predictor.predict(images, names=[p.name for p in frames], noise_seeds=[r.noise_seed for r in results])
assert again == results, 'the recorded noise seeds did not reproduce the results'
report = {'engine': predictor.engine.describe(), 'answer_s': answered / len(images),
          'certificate_s': (time.perf_counter() - began - answered) / (2 * len(images)),
          'answers': [a.label for a in answers], 'results': [r.to_dict() for r in results]}
json.dump(report, open('$OUT/predictor.json', 'w'), indent=2, default=str)
print({k: report[k] for k in ('engine', 'answer_s', 'certificate_s', 'answers')})
"
step bench "$PYTHON" scripts/bench_latency.py --device "$DEVICE" --arch "$ARCH" --input-size "$INPUT_SIZE" \
    --out "$OUT" "${BENCH[@]}"
echo "All steps passed; figures in $OUT (environment.json, loio-folds.json, predictor.json, bench.json)"
