#!/usr/bin/env bash
# `make gpu-check`: one short check of the GPU path (about 8 min on one H200).
#
#   bash benchmarks/gpu_check.sh
#   (environment: PYTHON, OUT, WORK, PEER, TRAINER, EPOCHS, BUDGET_MIN, BATCHES, BENCH_ARGS)
#
# 1. what `precision: auto` chooses on this GPU for the default network;
# 2. the default experiment with trainer=gpu, all its 40 epochs where they fit in BUDGET_MIN
#    minutes (the time budget plans the epochs from the measured step rate), then
#    difflab-evaluate DDIM-50 on 500 samples, the README's quality check;
# 3. benchmarks/bench.py on the GPU at the peers' batch of 64 and at 1024 (BATCHES).
# What it keeps is flat under OUT (default outputs/gpu_check): log.txt, runs.tgz (the training
# and evaluation run directories, without checkpoints), results.md, bench-b<batch>.json. The
# runs themselves live under WORK (default OUT).
set -u -o pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_check}
PEER=${PEER:-../shared/peer_bench.py}
EPOCHS=${EPOCHS:-40}
BUDGET_MIN=${BUDGET_MIN:-2}
TRAINER=${TRAINER:-gpu}
BATCHES=${BATCHES:-64 1024}
WORK=${WORK:-$OUT}
RUN=$WORK/train
EVAL=$WORK/evaluate
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
started=$SECONDS
step() { echo; echo "== [$((SECONDS - started)) s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
if [ "$TRAINER" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch sees no CUDA GPU here, so trainer=$TRAINER cannot run. Run it on a machine with one," \
       "or TRAINER=cpu EPOCHS=1 BATCHES=8 BENCH_ARGS=--quick to try the script itself on the CPU."
  exit 2
fi
status=0
step "precision: auto for the default network"
PYTHONPATH="benchmarks:$PYTHONPATH" "$PY" - <<'EOF' || status=1
import torch
import bench  # its default network (conf/train.yaml's model) and its auto_choice()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
      f"{torch.get_num_threads()} CPU threads")
bench.DEVICE = torch.device(bench.pick_device("auto"))
choice = bench.auto_choice()
print(f"precision auto for {bench.DEFAULT_MODEL} -> {choice['precision']}, channels_last={choice['channels_last']}")
EOF

step "difflab-train trainer=$TRAINER trainer.max_epochs=$EPOCHS trainer.budget_minutes=$BUDGET_MIN"
rm -rf "$RUN" "$EVAL"
timeout $((BUDGET_MIN * 60 + 150)) "$PY" -m difflab.cli.train "trainer=$TRAINER" "trainer.max_epochs=$EPOCHS" \
  "trainer.budget_minutes=$BUDGET_MIN" "hydra.run.dir=$RUN" || status=1
[ -f "$RUN/result.json" ] && cat "$RUN/result.json"

step "difflab-evaluate DDIM-50, 500 samples"
if [ -f "$RUN/checkpoints/ema.pt" ]; then
  timeout 150 "$PY" -m difflab.cli.evaluate "ckpt=$RUN/checkpoints/ema.pt" "samplers=[ddim]" "steps=[50]" \
    "hydra.run.dir=$EVAL" || status=1
  [ -f "$EVAL/results.md" ] && cp "$EVAL/results.md" "$OUT/results.md" && cat "$OUT/results.md"
else
  echo "no $RUN/checkpoints/ema.pt: training did not finish"; status=1
fi
tar czf "$OUT/runs.tgz" --exclude='*.ckpt' --exclude='*.pt' -C "$WORK" train evaluate 2>/dev/null

for batch in $BATCHES; do
  step "bench.py --batch $batch"
  timeout 300 "$PY" benchmarks/bench.py --peer "$PEER" --batch "$batch" --out "$OUT/bench-tmp" ${BENCH_ARGS:-} \
    > "$OUT/bench-b$batch.json" || status=1
done
rm -rf "$OUT/bench-tmp"
step "done (status $status)"
exit $status
