# The README's two set-up commands: `make demo` (main job on the embedded tiny default) and `make test`.
# Both create ./.venv on first use: torch first (so a plain `torch` requirement cannot pull a
# multi-GB CUDA build onto a CPU machine), then the project with its dev extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Extra pip flags for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
RUN_DIR ?= runs/demo

.PHONY: demo test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: install flash-attn with: $(BIN)/pip install -e '.[gpu]' --no-build-isolation"; fi
	touch $@

demo: venv
	$(BIN)/midpo run --config tiny run_dir=$(RUN_DIR)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
