# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install train test bench bench-train experiments clean

# Benchmark summaries go to $(RESULTS): untracked by default; `make bench RESULTS=benchmarks/results`
# records a run beside the committed result files (one per machine class).
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

# The CPU benchmarks run once per machine class this machine can be measured as (its own, and AVX2 below it
# where the CPU has more: benchmarks/run_levels.py), each summarised into $(RESULTS)/NAME-CLASS.json with the
# capabilities it ran with.
# CPU kernel benchmarks (pytest-benchmark): $(RESULTS)/cpu_kernels-CLASS.json.
bench: $(STAMP)
	$(PY) benchmarks/run_levels.py cpu_kernels $(RESULTS) benchmarks/summarize.py \
		benchmarks/test_kernels_cpu.py --benchmark-max-time=0.5

# Training-step benchmarks beside flow_matching's and torchcfm's plain loops (torchcfm without its
# heavy optional dependencies: only its ConditionalFlowMatcher is used): $(RESULTS)/cpu_train-CLASS.json.
bench-train: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]" && $(PY) -m pip install -q --no-deps torchcfm
	$(PY) benchmarks/run_levels.py cpu_train $(RESULTS) benchmarks/summarize.py benchmarks/test_train_cpu.py

# SiT-S/2 training steps (batch 64, 32x32x4 latents, 1000 classes) beside diffusers' DiTTransformer2DModel of the
# same size, each eager and compiled (bf16 too where native): $(RESULTS)/cpu_sit-CLASS.json.
.PHONY: bench-sit
bench-sit: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_levels.py cpu_sit $(RESULTS) benchmarks/summarize_sit.py benchmarks/test_sit_cpu.py

# The peers the GPU check compares with (diffusers, flow_matching) as wheels for its machine, which has no network
# (Python 3.12; both are pure Python), pinned to the versions installed here: carry .whl with
# benchmarks/gpu/check.sh, which installs them (CHECK_WHEELS).
.PHONY: gpu-wheels
gpu-wheels: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl $$($(PY) -c \
		'from importlib.metadata import version; print(*(f"{p}=={version(p)}" for p in ("diffusers", "flow_matching")))')

# Exported-engine benchmarks on CPU (pytest-benchmark) against eager, torch.compile and flow_matching's
# ODESolver: $(RESULTS)/cpu_export-CLASS.json (about 40 minutes per class on 2 cores).
.PHONY: bench-export
bench-export: $(STAMP)
	$(PY) benchmarks/run_levels.py cpu_export $(RESULTS) benchmarks/summarize_export.py benchmarks/test_export_cpu.py

# Few-step engines (MeanFlow 1/2/4 steps, the reflowed model's Euler) against the teacher's ODE engine and
# flow_matching's 16-step midpoint ODESolver, each with the quality it reaches: $(RESULTS)/cpu_fewstep-CLASS.json.
# It times the fewstep experiment's checkerboard runs, running the experiment first where they are missing.
.PHONY: bench-fewstep
bench-fewstep: $(STAMP)
	test -f runs/experiments/fewstep/runs/checkerboard-meanflow/model.json || $(PY) -m fastfm.experiments fewstep
	$(PY) benchmarks/run_levels.py cpu_fewstep $(RESULTS) benchmarks/summarize_fewstep.py benchmarks/test_fewstep_cpu.py

# The papers' experiments (paths, interpolants, conditional, fewstep, backbones) at the default CPU scale: reports,
# figures and JSON under runs/experiments/ (about 45 minutes on 2 cores: the five measured one at a time; --scale gpu
# for one GPU).
experiments: $(STAMP)
	$(PY) -m fastfm.experiments all

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
