# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install train test bench bench-train experiments clean

# Benchmark summaries go to $(RESULTS): untracked by default; `make bench RESULTS=benchmarks/results`
# records a run over the committed result files.
RESULTS ?= .benchmarks/results

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"  # also builds csrc/ into fastfm._C
	touch $(STAMP)

install: $(STAMP)

# 2D checkerboard, MLP, CondOT path, compiled with bf16 autocast: a few minutes on 2 CPU cores.
train: $(STAMP)
	$(PY) -m fastfm.train --compile --bf16 --out runs/default --force

test: $(STAMP)
	$(PY) -m pytest -q tests

# CPU kernel benchmarks (pytest-benchmark), summarised into $(RESULTS)/cpu_kernels.json.
bench: $(STAMP)
	$(PY) -m pytest -q benchmarks/test_kernels_cpu.py --benchmark-max-time=0.5 \
		--benchmark-json=.benchmarks/cpu_kernels_raw.json
	$(PY) benchmarks/summarize.py .benchmarks/cpu_kernels_raw.json $(RESULTS)/cpu_kernels.json

# Training-step benchmarks beside flow_matching's and torchcfm's plain loops (torchcfm without its
# heavy optional dependencies: only its ConditionalFlowMatcher is used).
bench-train: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]" && $(PY) -m pip install -q --no-deps torchcfm
	$(PY) -m pytest -q benchmarks/test_train_cpu.py --benchmark-json=.benchmarks/cpu_train_raw.json
	$(PY) benchmarks/summarize.py .benchmarks/cpu_train_raw.json $(RESULTS)/cpu_train.json

# Exported-engine benchmarks on CPU (pytest-benchmark) against eager, torch.compile and flow_matching's
# ODESolver, summarised into $(RESULTS)/cpu_export.json (about 15 minutes on 2 cores).
.PHONY: bench-export
bench-export: $(STAMP)
	$(PY) -m pytest -q benchmarks/test_export_cpu.py --benchmark-json=.benchmarks/cpu_export_raw.json
	$(PY) benchmarks/summarize_export.py .benchmarks/cpu_export_raw.json $(RESULTS)/cpu_export.json

# The papers' experiments (paths, interpolants, conditional) at the default CPU scale: reports, figures and JSON
# under runs/experiments/ (26 minutes on 2 cores; --scale gpu for one GPU).
experiments: $(STAMP)
	$(PY) -m fastfm.experiments all

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
