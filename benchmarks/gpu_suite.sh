#!/usr/bin/env bash
# The GPU measurements of dino_hf in one command (under 9 minutes on an H200):
#   end-to-end pretraining from JPEG files with GPU and with CPU augmentation, batched multi-crop,
#   the training step at batch 128 and 256 (eager and compiled) against the reference-style step,
#   the step with iBOT and with iBOT + Gram against DINO alone, the ViT-L/16 LoRA step against the full one,
#   the small-model (overhead-bound) run, and the CUDA tests.
# Each part runs under its own `timeout`; a part that fails or times out is reported and the suite
# goes on. The figures are collected in a markdown table, printed at the end and written to
# $OUT/gpu_suite.md when OUT is set (with every part's full output next to it).
#
#     bash benchmarks/gpu_suite.sh
#
# Without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "benchmarks/gpu_suite.sh: no CUDA device here, nothing measured"
  exit 0
fi

out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
table="$out/gpu_suite.md"
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))

{
  echo "# dino_hf GPU suite, $(date -u +%Y-%m-%d)"
  echo
  python3 -c "import torch, transformers, timm; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}, timm {timm.__version__}')"
  echo
  echo "| part | seconds | status | figures |"
  echo "|---|---|---|---|"
} > "$table"

# part NAME LIMIT_SECONDS PATTERN COMMAND...: runs COMMAND under timeout, keeps its output in
# $out/NAME.log and puts the lines matching PATTERN (the benchmark's figures) into the table.
part() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  local took=$((SECONDS - start))
  local verdict="ok"
  [ $status -eq 124 ] && verdict="timed out"
  [ $status -ne 0 ] && [ $status -ne 124 ] && verdict="failed ($status)"
  local figures
  figures=$(grep -E "$pattern" "$out/$name.log" | sed -E 's/[[:space:]]+/ /g; s/\|/\//g' | paste -sd ';' -)
  echo "| $name | $took | $verdict | ${figures:-see $name.log} |" >> "$table"
  tail -n 25 "$out/$name.log"
}

part end_to_end_gpu_augment 110 "images/s|MFU|waiting|multi-crop|workers|ratio" \
  python3 benchmarks/end_to_end.py --augment_on gpu --workers "$workers" --steps 30 --warmup 8
part end_to_end_cpu_augment 100 "images/s|MFU|waiting|workers|ratio" \
  python3 benchmarks/end_to_end.py --augment_on cpu --workers "$workers" --steps 20 --warmup 5
part batch_multicrop 60 "images/s|ratio" \
  python3 benchmarks/batch_multicrop.py --gpu_batch 256 --rounds 3
part train_step_b128 70 "images/s|seconds/step|ratio|memory" \
  python3 benchmarks/train_step.py --batch 128 --repeats 1
part train_step_b256 80 "images/s|seconds/step|ratio|memory" \
  python3 benchmarks/train_step.py --batch 256 --repeats 1
part train_step_ibot_b128 90 "images/s|seconds/step|ratio|memory" \
  python3 benchmarks/train_step.py --batch 128 --repeats 1 --ibot
part train_step_distill_b128 80 "images/s|seconds/step|ratio|memory|share" \
  python3 benchmarks/train_step.py --batch 128 --repeats 1 --distill
part train_step_distill_multi_b128 90 "images/s|seconds/step|ratio|memory|share|teacher" \
  python3 benchmarks/train_step.py --batch 128 --repeats 1 --distill_multi
part train_step_b128_compiled 150 "images/s|seconds/step|ratio|memory|compile|recompil" \
  python3 benchmarks/train_step.py --batch 128 --repeats 1 --torch_compile
part train_step_lora_vitl 90 "seconds/step|ratio|memory|trainable" \
  python3 benchmarks/train_step.py --lora --models vit_large_patch16 --batch 4 --warmup 2 --steps 5 --repeats 1
part small_model 90 "images/s|steps/s|ratio|waiting" \
  python3 benchmarks/end_to_end.py --model vit_tiny_patch8 --global_size 64 --local_size 32 --batch 256 \
    --out_dim 4096 --workers "$workers" --steps 40 --warmup 10
part cuda_tests 120 "passed|failed|error" \
  python3 -m pytest -q -p no:cacheprovider -k "cuda or fsdp_run_matches" tests

echo
cat "$table"
