#!/usr/bin/env bash
# Issue 24's report on SmolLM2-135M: every quantized form of the dense model and of DLP-Wanda 50%, exported and
# validated (deployed perplexity, 8 WikiText-2 windows of 256), then measured in one interleaved bench run.
# Needs the pruned model and the fp32 deployments of the headline sweep (runs/headline, README's Results).
set -euo pipefail
cd "$(dirname "$0")/.."
DLP=runs/headline/models/wanda-dlp-0.50
OUT=runs/q24
V="--ppl-windows 8 --ppl-tolerance 1.0"
ONNX="--engines onnxruntime,openvino $V"
mkdir -p $OUT
run() { name=$1; shift; [ -e $OUT/$name/export.json ] || dlp-deploy export "$@" --out $OUT/$name; }
for src in dense dlp50; do
  m=smollm2-135m; [ $src = dlp50 ] && m=$DLP
  run $src-static $m --quantize int8 --act-scales static $ONNX
  run $src-dynamic $m --quantize int8 --act-scales dynamic-token $ONNX
  run $src-w8 $m --quantize w8 $ONNX
  run $src-int4-g32 $m --quantize int4 --group-size 32 $ONNX
  run $src-int4-g128 $m --quantize int4 --group-size 128 $ONNX
  run $src-q8_0 $m --format gguf --quant q8_0 $V
  run $src-q4_k_m $m --format gguf --quant q4_k_m $V
done
run dlp50-budget3 $DLP --quantize int8 --act-scales dynamic-token --quality-budget --engines onnxruntime \
    --ppl-windows 8 --ppl-tolerance 0.03
run dense-gptq32 smollm2-135m --quantize int8 --act-scales dynamic-token --weight-method gptq --calib-samples 32 \
    --engines onnxruntime $V
run dlp50-gptq32 $DLP --quantize int8 --act-scales dynamic-token --weight-method gptq --calib-samples 32 \
    --engines onnxruntime $V
[ -e $OUT/bench.json ] || dlp-deploy bench runs/headline/deploy/dense runs/headline/deploy/wanda-dlp-0.50 \
    $OUT/dense-static $OUT/dense-dynamic $OUT/dense-w8 $OUT/dense-int4-g32 \
    $OUT/dlp50-static $OUT/dlp50-dynamic $OUT/dlp50-w8 $OUT/dlp50-int4-g32 \
    $OUT/dense-q8_0 $OUT/dense-q4_k_m $OUT/dlp50-q4_k_m \
    --engine deepsparse --engine onnxruntime --engine openvino --engine llamacpp --runs 3 --gen-len 64 \
    --json $OUT/bench.json
python scripts/quant_report.py --exports $OUT --fp32 runs/headline/deploy/dense runs/headline/deploy/wanda-dlp-0.50 \
    --bench $OUT/bench.json --out reports/smollm2-135m-quant
