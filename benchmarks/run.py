"""Run benchmarks and record their results in benchmarks/RESULTS.md.

    python benchmarks/run.py            # every benchmark (gpu only where a CUDA device is)
    python benchmarks/run.py metrics    # one of them (bench_<name>.py)

Each benchmark module has ``main() -> str`` returning a Markdown section; this
script stamps it with the machine, the date and the command, and replaces that
benchmark's section in RESULTS.md, leaving the others as they were (a module whose
``RECORD`` is false only prints it).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def record(name: str, body: str) -> None:
    stamp = (f"Machine: {machine()}  \nDate: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  \n"
             f"Command: `make bench` or `.venv/bin/python benchmarks/run.py {name}`\n")
    section = f"<!-- bench:{name} -->\n{body.strip()}\n\n{stamp}<!-- /bench:{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")


def main(names: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    if not names:
        import torch

        names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
        if not torch.cuda.is_available():
            names.remove("gpu")
            print("== gpu: skipped, no CUDA device here (benchmarks/bench_gpu.py says how to run it)", flush=True)
    for name in names:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench_{name}")
        body = module.main()
        print(body)
        if getattr(module, "RECORD", True):
            record(name, body)


if __name__ == "__main__":
    main(sys.argv[1:])
