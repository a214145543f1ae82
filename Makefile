PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

EVAL_SAMPLE := --ppl wikitext2 --suite arc --speed --limit 16 --context-length 512 --stride 256

.PHONY: demo test install install-test llama-cpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llama.cpp (llama-cpp-python) built for this CPU's instruction sets, without ggml's AMX path unless
# SLMKIT_LLAMA_AMX=1: checked on every install (a second when nothing changed); a wheel is kept per CPU and flags
# under ~/.cache/slmkit-machine/wheels and pip's cache is never used for it.
llama-cpp: $(BIN)/python
	$(BIN)/python src/slmkit/cpu_build.py ensure --python $(BIN)/python --constraints constraints.txt

# Re-install only when the project's metadata or pins change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt | llama-cpp
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: llama-cpp $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/slmkit models list
	$(BIN)/slmkit run --seed 0 --max-tokens 120 "In two sentences, why would a developer run a small language model on their own laptop?"
	@echo "--- shrink it: int8 weights in PyTorch (kept in the store as smollm2-135m-instruct-int8-rtn) ---"
	$(BIN)/slmkit models show smollm2-135m-instruct-int8-rtn --json >/dev/null 2>&1 || $(BIN)/slmkit quantize --scheme int8
	@echo "--- make it smaller: remove the 6 least important of its 30 decoder blocks (structured pruning, no retraining) ---"
	$(BIN)/slmkit models show smollm2-135m-instruct-depth-minus6 --json >/dev/null 2>&1 || $(BIN)/slmkit prune --structured depth --blocks 6 --no-ppl
	@echo "--- a quick evaluation on a sample: float32, int8 and depth-pruned in PyTorch, the packaged Q4_1 GGUF in llama.cpp ---"
	@mkdir -p demo-results
	$(BIN)/slmkit eval $(EVAL_SAMPLE) --out demo-results/torch-f32.json
	$(BIN)/slmkit eval smollm2-135m-instruct-int8-rtn $(EVAL_SAMPLE) --out demo-results/torch-int8.json
	$(BIN)/slmkit eval smollm2-135m-instruct-depth-minus6 $(EVAL_SAMPLE) --out demo-results/torch-depth.json
	$(BIN)/slmkit eval --backend llamacpp $(EVAL_SAMPLE) --out demo-results/llamacpp-q4_1.json
	$(BIN)/slmkit compare demo-results/torch-f32.json demo-results/torch-int8.json demo-results/torch-depth.json demo-results/llamacpp-q4_1.json --html demo-results/report.html

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
