#!/usr/bin/env bash
# Issue 27: `dlp-deploy plan` on SmolLM2-135M at perplexity budgets of 3%, 10% and 50% (20 minutes each), then
# one interleaved bench that measures the three choices again beside dense fp32 and the llama.cpp peers (the
# replication: a speed the plan claims must show again in a separate run), then the report. One job at a time:
# the plans measure speed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}
M=smollm2-135m
BUDGETS=${BUDGETS:-"3 10 50"}
ENGINES=${ENGINES:-onnxruntime,deepsparse}  # DeepSparse: the one engine with sparse kernels
# one calibration pass of Wanda's 128 x 2048 tokens takes ~12 min on 2 cores, and a plan makes one for the screen
# and one per survivor it prunes: 64 x 512 (32k tokens) keeps a plan near its 20 minutes
CALIB=${CALIB:-"--nsamples 64 --calib-seqlen 512"}
# stage 3's references alone (dense fp32 and its A/A on two engines, three llama.cpp peers, 3 rounds each) took a
# 20-minute plan's whole measuring time at 5 runs of 128 tokens; 3 runs of 64 leave time for the candidates
MEASURE=${MEASURE:-"--runs 3 --gen-len 64 --test-windows 32"}
for b in $BUDGETS; do
  x=$(python3 -c "print($b / 100)")
  [ -e $OUT/plan-$b/plan.json ] && continue  # finished: rerunning would give a resumed plan a new --time-budget
  /usr/bin/time -v -o $OUT/plan-$b.time dlp-deploy plan $M --max-ppl-increase "$x" --engines $ENGINES $CALIB $MEASURE --time-budget 20 --out $OUT/plan-$b
done
# the replication: every plan measures dense fp32, the peers and an A/A control in its own run, so each choice's
# comparisons are measured again wherever another plan measured it (the report's "across plans" table);
# REPLICATE=1 also measures the three choices together in one more interleaved bench
BENCH=()
if [ -n "${REPLICATE:-}" ]; then
  REP=$OUT/plan-rep
  mkdir -p $REP  # hard-linked copies, not symlinks: bench labels a symlinked folder by where it leads
  first=$(echo $BUDGETS | cut -d' ' -f1)
  rm -rf $REP/dense-fp32; cp -al "$(realpath $OUT/plan-$first/deploy/dense)" $REP/dense-fp32
  args=("$REP/dense-fp32@onnxruntime")
  for p in q8_0 q4_k_m source; do
    [ -e $OUT/plan-$first/deploy/dense.$p ] || continue
    rm -rf $REP/dense-$p; cp -al "$(realpath $OUT/plan-$first/deploy/dense.$p)" $REP/dense-$p
    args+=("$REP/dense-$p@llamacpp")
  done
  for b in $BUDGETS; do
    eng=$(python3 -c "import json; print(json.load(open('$OUT/plan-$b/choice.json'))['engine'])")
    rm -rf $REP/choice-$b; cp -al "$(realpath $OUT/plan-$b/deployment)" $REP/choice-$b
    args+=("$REP/choice-$b@$eng")
  done
  [ -e $REP/bench.json ] || dlp-deploy bench "${args[@]}" --runs 3 --rounds 3 --gen-len 64 --prompt-len 64 \
      --json $REP/bench.json
  BENCH=(--bench $REP/bench.json)
fi
python scripts/plan_report.py --plans $(for b in $BUDGETS; do echo -n "$OUT/plan-$b "; done) "${BENCH[@]}" \
    --out reports/smollm2-135m-plan --reproduce "bash scripts/plan_study.sh"
