"""Run a CPU benchmark suite once per machine class this machine can be measured as, and summarise each run.

    python benchmarks/run_levels.py NAME RESULTS SUMMARIZER PYTEST_ARGS...

For every class of ``python -m fastfm.hardware --levels`` (the CPU's own, and the AVX2 class below it where the
CPU has more: oneDNN and ATen capped by ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), runs
``pytest PYTEST_ARGS --benchmark-json=.benchmarks/NAME-CLASS_raw.json`` in that environment, then
``python SUMMARIZER RAW RESULTS/NAME-CLASS.json``. Each summary records the capabilities the run saw
(``fastfm.hardware``), so every number names its machine class.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastfm import hardware


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    name, results, summarizer, pytest_args = argv[0], Path(argv[1]), argv[2], argv[3:]
    raw_dir = Path(".benchmarks")
    raw_dir.mkdir(exist_ok=True)
    for cls, env in hardware.levels().items():
        raw, out = raw_dir / f"{name}-{cls}_raw.json", results / f"{name}-{cls}.json"
        print(f"== {name} as {cls} {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        run_env = {**os.environ, **env}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *pytest_args, f"--benchmark-json={raw}"],
                             env=run_env)
        if rc != 0:
            return rc
        rc = subprocess.call([sys.executable, summarizer, str(raw), str(out)], env=run_env)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
