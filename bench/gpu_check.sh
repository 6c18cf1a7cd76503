#!/usr/bin/env bash
# The real-model recipe (recipes/smollm2_135m_cpu.yaml) on one GPU, offline: Unsloth training on the base loaded in
# 4 bits (bitsandbytes) with 8-bit AdamW, apply.device: cuda, merge.device: cuda (the fused engine, then the mergekit
# engine into a second output for comparison), evaluate on cuda. Prints each stage's time and, for a stage that
# breaks, the end of its output; the full logs go to .gpu/logs/ (and, joined, to $OUT/gpu_check.log when $OUT is
# set). lm-eval and the GGUF export are left out: they do not use the GPU, and they ran on CPU.
#
# On a GPU machine with the project installed (`make setup`, or pip install -e '.[unsloth]' with bitsandbytes):
#   bash bench/gpu_check.sh
# On a machine with only PyTorch, transformers, peft and accelerate and no network: prepare .gpu/ here with
# bench/gpu_check_bundle.sh, bring .gpu/wheels and .gpu/model/* there (the model's parts may travel ahead, in
# separate calls, into .gpu/model/ of the same checkout), then run this script: it installs the wheels into
# /tmp/ftmerge-site, joins the model's parts and builds base and target from them.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=.gpu/logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
RECIPE=recipes/smollm2_135m_cpu.yaml
RUN_DIR=${RUN_DIR:-runs/smollm2-gpu-check}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# GPU_CHECK_DEVICE=cpu rehearses the script's plumbing on a machine without a GPU (no 4-bit, no 8-bit AdamW)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftmerge-site \
    .gpu/wheels/*.whl || { echo "BROKE: installing .gpu/wheels"; exit 1; }
  export PYTHONPATH="/tmp/ftmerge-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ]; then
  "$PY" - <<'EOF' || { echo "BROKE: no CUDA device for torch"; exit 1; }
import torch
assert torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
  QUANTIZED=(--set train.load_in_4bit=true --set train.optim=adamw_8bit)
else
  QUANTIZED=()
fi

GGUF_ARGUMENT=()
if ls .gpu/model/*.part-* >/dev/null 2>&1; then
  name=$(awk '{print $2}' .gpu/model/SHA256SUMS)
  cat .gpu/model/"$name".part-* > "/tmp/$name"
  (cd /tmp && sha256sum -c "$OLDPWD/.gpu/model/SHA256SUMS") >/dev/null \
    || { echo "BROKE: the model's parts do not join into its GGUF"; exit 1; }
  GGUF_ARGUMENT=(--gguf "/tmp/$name")
fi

declare -a ROWS
STATUS=0
timed() {  # timed LABEL COMMAND...: runs COMMAND, records its time, prints the end of its output if it fails
  local label=$1; shift
  local started=$SECONDS log="$LOGS/$label.log"
  "$@" >"$log" 2>&1
  local code=$?
  local result=ok
  [ $code = 0 ] || result="BROKE (exit $code)"
  ROWS+=("$(printf '%-22s %6ss  %s' "$label" "$((SECONDS - started))" "$result")")
  if [ $code != 0 ]; then
    STATUS=1
    echo "---- $label broke (exit $code); the end of $log:"; tail -n 25 "$log"
  fi
  echo "${ROWS[-1]}"
  return $code
}

DEVICES=(--set "apply.device=$DEVICE" --set "merge.device=$DEVICE" --set "evaluate.device=$DEVICE")
SETTINGS=(
  --set "output_dir=$RUN_DIR" "${QUANTIZED[@]}" "${DEVICES[@]}" --set "evaluate.lm_eval.tasks=[]" --set export.gguf=null
)
timed build-models "$PY" -m pipeline.demo.smollm2 "${GGUF_ARGUMENT[@]}" || exit 1
for stage in prepare train archive apply merge evaluate; do
  timed "$stage" "$PY" -m pipeline.run "$RECIPE" "${SETTINGS[@]}" --stage "$stage" || break
done
if [ $STATUS = 0 ]; then
  # the same adapters, applied and merged again with the mergekit engine into a run of their own
  timed merge-mergekit-engine "$PY" -m pipeline.run "$RECIPE" "${DEVICES[@]}" --set "output_dir=$RUN_DIR-mergekit" \
    --set "archive_dir=$RUN_DIR/adapters" --set "finetunes=[]" --set "merge.adapters=[reverse, numbered]" \
    --set merge.engine=mergekit --set export.gguf=null --stage apply --stage merge
  timed compare-engines "$PY" - "$RUN_DIR/merge" "$RUN_DIR-mergekit/merge" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

def tensors(directory):
    return {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}


fused, mergekit = tensors(sys.argv[1]), tensors(sys.argv[2])
assert sorted(fused) == sorted(mergekit), "different tensor names"
worst = max((fused[k].float() - mergekit[k].float()).abs().max().item() for k in fused)
same = sum(torch.equal(fused[k], mergekit[k]) for k in fused)
print(f"fused vs mergekit engine: {same}/{len(fused)} tensors identical, largest difference {worst:.3g}")
EOF
  tail -n 1 "$LOGS/compare-engines.log"
fi
echo
echo "stage                   time  result"
printf '%s\n' "${ROWS[@]}"
[ -f "$RUN_DIR/evaluate/report.md" ] && head -n 30 "$RUN_DIR/evaluate/report.md"
if [ -n "${OUT:-}" ]; then
  for log in "$LOGS"/*.log; do echo "==== $log"; cat "$log"; done > "$OUT/gpu_check.log"
  [ -f "$RUN_DIR/evaluate/report.md" ] && cp "$RUN_DIR/evaluate/report.md" "$OUT/report.md"
fi
exit $STATUS
