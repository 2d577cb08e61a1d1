#!/usr/bin/env bash
# lmms-eval end to end, offline. Called from .ci/run; runnable by hand:
#
#   bash eval/lmms/ci_lmms.sh
#
# 1. installs lmms-eval 0.7.3 by the recipe in eval/lmms/INSTALL_NOTES.md into the
#    current environment (lmms-eval without its dependency list, its core's imports
#    constrained to the installed torch/transformers) and checks that torch and
#    transformers are untouched and still import LLaVA;
# 2. runs `lmms-eval --model pumer_llava` with the embedded proxy model on the local
#    pumer_proxy task (generate): reduced (ratio 0.25, PuMer) at batch size 8, 1 and
#    on 2 processes, unreduced (method=none); and on the local pumer_proxy_mc task
#    (multiple choice): unreduced, reduced on 1 and 2 processes, reduced at layer 0;
# 3. checks the written files (the CLI exits 0 even when it failed): batch size 8, 1
#    and 2 processes answer alike, the statistics of 2 processes add up to every
#    sample, the accuracy equals the project's own scoring of the same questions
#    (eval/lmms/reference_score.py), and unreduced multiple choice has the losses the
#    project's full forwards give.
#
# Environment: PYTHON (default python), PUMER_LMMS_MODEL (default the embedded
# proxy), PUMER_LMMS_LIMIT (default 40), PUMER_LMMS_OUT (default a temp folder),
# PUMER_LMMS_INSTALL_ONLY (set: install and verify, then stop).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python}
MODEL=${PUMER_LMMS_MODEL:-pumer_llava/assets/proxy-llava}
LIMIT=${PUMER_LMMS_LIMIT:-40}
OUT=${PUMER_LMMS_OUT:-$(mktemp -d -t pumer-lmms-XXXXXX)}
mkdir -p "$OUT"
DATA=eval/data/proxy_test  # the path pumer_proxy.yaml reads
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_CACHE="$OUT/hf-datasets"  # no stale dataset cache between runs

echo "== lmms-eval: install (eval/lmms/INSTALL_NOTES.md)"
before=$("$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)")
"$PY" - > "$OUT/constraints.txt" <<'EOF'
import accelerate, numpy, torch, transformers
print(f"torch=={torch.__version__.split('+')[0]}")
print(f"transformers=={transformers.__version__}")
print(f"accelerate=={accelerate.__version__}")
print(f"numpy=={numpy.__version__}")
EOF
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('lmms-eval') != '0.7.3')" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps lmms-eval==0.7.3
fi
"$PY" -m pip install -q -c "$OUT/constraints.txt" -r eval/lmms/requirements.txt
has_entry_point() {
  "$PY" -c "
import importlib.metadata as m, sys
sys.exit(not any(ep.name == 'pumer_llava' for ep in m.entry_points(group='lmms_eval.models')))"
}
if ! has_entry_point; then
  "$PY" -m pip install -q --no-deps -e .
fi
if ! has_entry_point; then
  echo "FAILED: no 'pumer_llava' entry point in group lmms_eval.models: pyproject.toml needs" >&2
  echo '  [project.entry-points."lmms_eval.models"] pumer_llava = "pumer_llava.lmms_eval_plugin:manifest"' >&2
  exit 1
fi
after=$("$PY" -c "import torch, transformers; from transformers import LlavaForConditionalGeneration; print(torch.__version__, transformers.__version__)")
if [ "$before" != "$after" ]; then
  echo "FAILED: installing lmms-eval changed torch/transformers: '$before' -> '$after'" >&2
  exit 1
fi
echo "torch/transformers intact: $after"
"$PY" -c "from lmms_eval.models import get_model; print('lmms-eval resolves pumer_llava to', get_model('pumer_llava'))"
if [ -n "${PUMER_LMMS_INSTALL_ONLY:-}" ]; then
  exit 0
fi

echo "== lmms-eval: data and model"
# always rewritten: a split left by an older checkout (other phrasing) would be scored silently
rm -rf "$DATA"
"$PY" eval/proxy_task.py --out "$DATA"
if [ ! -f "$MODEL/config.json" ]; then
  echo "FAILED: no model at $MODEL (the embedded proxy checkpoint)" >&2
  exit 1
fi

run_lmms() {  # label, batch size, extra model args[, task[, processes]]
  local label=$1 bs=$2 extra=$3 task=${4:-pumer_proxy} procs=${5:-1}
  local launch=("$PY" -m lmms_eval)
  if [ "$procs" -gt 1 ]; then  # N processes on the CPU: accelerate's multi-process launcher, gloo
    launch=(env ACCELERATE_USE_CPU=true "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$procs"
            --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port "$((29500 + RANDOM % 1000))"
            -m lmms_eval)
  fi
  echo "-- lmms-eval $label: $task, batch size $bs, $extra, $procs process(es)"
  "${launch[@]}" --model pumer_llava \
    --model_args "pretrained=$MODEL,$extra" \
    --include_path eval/lmms/tasks --tasks "$task" \
    --batch_size "$bs" --limit "$LIMIT" --log_samples \
    --output_path "$OUT/$label" > "$OUT/$label.log" 2>&1 || true  # judged by its files below
  grep -E "^\|$task|Error during evaluation|Traceback" "$OUT/$label.log" || tail -20 "$OUT/$label.log"
}

echo "== lmms-eval: runs (logs in $OUT)"
run_lmms reduced_bs8 8 "ratio=0.25,method=pumer"
run_lmms reduced_bs1 1 "ratio=0.25,method=pumer"
run_lmms reduced_2proc 8 "ratio=0.25,method=pumer" pumer_proxy 2
run_lmms unreduced_bs8 8 "method=none"
# multiple choice (loglikelihood): the colour questions, the six colour words as choices
run_lmms mc_unreduced 6 "method=none" pumer_proxy_mc
run_lmms mc_reduced 6 "ratio=0.25,method=pumer" pumer_proxy_mc
run_lmms mc_reduced_2proc 6 "ratio=0.25,method=pumer" pumer_proxy_mc 2
run_lmms mc_layer0 6 "ratio=0.25,method=pumer,layers=0" pumer_proxy_mc
"$PY" eval/lmms/reference_score.py --model "$MODEL" --data "$DATA" --limit "$LIMIT" \
  --method pumer --ratio 0.25 --out "$OUT/reference_reduced.json"
"$PY" eval/lmms/reference_score.py --model "$MODEL" --data "$DATA" --limit "$LIMIT" \
  --method none --ratio 1.0 --out "$OUT/reference_unreduced.json"
"$PY" eval/lmms/reference_score.py --model "$MODEL" --data "$DATA" --limit "$LIMIT" \
  --method none --ratio 1.0 --multiple-choice --out "$OUT/reference_mc_unreduced.json"

echo "== lmms-eval: checks"
status=0
"$PY" eval/lmms/check_results.py --expect "$LIMIT" --expect-method pumer --expect-keep 0.25 \
  --run "bs8=$OUT/reduced_bs8" --run "bs1=$OUT/reduced_bs1" --run "2proc=$OUT/reduced_2proc" \
  --processes 2proc=2 --reference "$OUT/reference_reduced.json" || status=1
"$PY" eval/lmms/check_results.py --expect "$LIMIT" --expect-method none --expect-keep 1.0 \
  --run "unreduced=$OUT/unreduced_bs8" \
  --reference "$OUT/reference_unreduced.json" || status=1
# unreduced: every choice's loss as the project's full forwards of prompt and choice compute it
"$PY" eval/lmms/check_results.py --multiple-choice pumer_proxy_mc --expect "$LIMIT" \
  --run "mc_unreduced=$OUT/mc_unreduced" --reference "$OUT/reference_mc_unreduced.json" || status=1
# reduced: two processes choose what one does, with the same losses; layer 0 is complete
"$PY" eval/lmms/check_results.py --multiple-choice pumer_proxy_mc --expect "$LIMIT" --tol 1e-4 \
  --run "mc_reduced=$OUT/mc_reduced" --run "mc_reduced_2proc=$OUT/mc_reduced_2proc" \
  --processes mc_reduced_2proc=2 || status=1
"$PY" eval/lmms/check_results.py --multiple-choice pumer_proxy_mc --expect "$LIMIT" \
  --run "mc_layer0=$OUT/mc_layer0" || status=1
if [ $status -ne 0 ]; then
  for f in "$OUT"/*.log; do echo "---- $f (tail)"; tail -40 "$f"; done
  exit 1
fi
echo "lmms-eval end to end: OK"
