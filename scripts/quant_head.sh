#!/usr/bin/env bash
# Issue 24, second run: SmolLM2-135M's head is tied to its embedding (28M of its 135M weights, the largest
# matrix a decode step reads), and --quantize-head used to leave a tied head fp32. Dense fp32, INT8 dynamic
# per-token and w8, each with and without the head quantized, and the llama.cpp q8_0 / q4_k_m peers: exported,
# validated on ONNX Runtime and OpenVINO, then one interleaved bench (A/A control on every engine).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/q24h}
V="--ppl-windows 8 --ppl-tolerance 1.0"
ONNX="--engines onnxruntime,openvino $V"
M=smollm2-135m
mkdir -p $OUT
run() { name=$1; shift; [ -e $OUT/$name/export.json ] || dlp-deploy export "$@" --out $OUT/$name; }
run dense-fp32 $M $ONNX
run dense-dynamic $M --quantize int8 --act-scales dynamic-token $ONNX
run dense-dynamic-head $M --quantize int8 --act-scales dynamic-token --quantize-head $ONNX
run dense-w8 $M --quantize w8 $ONNX
run dense-w8-head $M --quantize w8 --quantize-head $ONNX
run dense-q8_0 $M --format gguf --quant q8_0 $V
run dense-q4_k_m $M --format gguf --quant q4_k_m $V
[ -n "${EXPORTS_ONLY:-}" ] && exit 0  # the bench needs a quiet machine: run it apart
[ -e $OUT/bench.json ] || dlp-deploy bench $OUT/dense-fp32@onnxruntime $OUT/dense-fp32@openvino \
    $OUT/dense-dynamic@onnxruntime $OUT/dense-dynamic-head@onnxruntime \
    $OUT/dense-w8@onnxruntime $OUT/dense-w8-head@onnxruntime $OUT/dense-w8@openvino $OUT/dense-w8-head@openvino \
    $OUT/dense-q8_0@llamacpp $OUT/dense-q4_k_m@llamacpp --runs 3 --rounds 3 --gen-len 64 --json $OUT/bench.json
python scripts/quant_report.py --exports $OUT --fp32 $OUT/dense-fp32 --bench $OUT/bench.json --only-exported \
    --reproduce "bash scripts/quant_head.sh" --out reports/smollm2-135m-quant-head
cp $OUT/bench.json reports/smollm2-135m-quant-head/bench.json
