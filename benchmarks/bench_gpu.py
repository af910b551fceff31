"""GPU throughput at IDEFICS2-8B size: training four ways, the feedback decoder against the reference, ZeRO-2.

    .venv/bin/python benchmarks/run.py gpu     # on a node with one CUDA GPU and the project installed
    bash benchmarks/gpu.sh                     # on a bare GPU machine (see that script)

Model: IDEFICS2-8B's real interface (config, tokenizer, processor: ``model.replica.write_interface``) with
random weights in bf16, built on the GPU from the config. Nothing is written to disk: within this benchmark the
loaders' ``AutoModel*.from_pretrained`` builds a folder that holds no weights from its config on the device
(16 GB of weights read from disk would tell nothing about speed). Data: ``bench_train.synthetic_round``
(synthetic games on the KiloGram tangrams) and the recipe's FFT and RL training sets.

1. Training: ``bench_train.measure`` synchronized (``torch.cuda.synchronize`` before each clock read), the four
   ways alternating in slices until the time budget; LoRA in the official placement (the default), Accelerate, bf16.
2. Where a step's time goes: two FFT micro-batches (game packing + cache) under torch.profiler, the device
   time split into matmuls, attention and the rest, its busy share of the wall time, and the top kernels.
3. Memory: FFT with game packing and the vision cache at micro-batches of 4, 8 and 16 games, with and without
   gradient checkpointing: what a bigger micro-batch gains and what checkpointing costs, for choosing
   ``micro_batch`` and ``training.gradient_checkpointing`` on this GPU.
4. Decoding: the FeedbackScorer at its defaults (``decoder.batch_tokens`` unset: sized to the GPU's free memory)
   against ``bench_decode.reference`` (3 generated tokens, prompts padded to 256, batches of 16), alternating
   on chunks of prompts, then the scorer once over all of them.
5. A ZeRO-2 task: ``Trainer.run`` with DeepSpeed ZeRO-2 in one process, one epoch of game packing with the
   vision cache: engine build, trained actions/s, validation and checkpoint included.

MFU: model FLOPs per second over the GPU's dense bf16 peak (989 TFLOP/s on an H100 SXM or H200), with N the
text model's parameters without embeddings: training 6 x N x the non-padding tokens trained, decoding
2 x N x the tokens the decoder runs; the report also gives the factor to the practical peak, square matmuls
timed on the same device. Peak memory is torch's peak allocation in each part. A part that fails is reported
as failed, with its error, and the next one runs; each part's table goes to stderr as soon as it is done.
BENCH_GPU_TINY=1: the same code paths on a replica-sized model in fp32 on this CPU (the figures mean nothing;
the tests run it). Knobs: BENCH_GPU_GAMES (48), BENCH_GPU_MICRO (4), BENCH_GPU_TRAIN_S (45 s of timed
micro-batches per objective), BENCH_GPU_SWEEP_S (8 s a point of the memory sweep), BENCH_GPU_PROMPTS (1000),
BENCH_GPU_ZERO2_GAMES (24), BENCH_GPU_INTERFACE (a folder of IDEFICS2-8B's interface as
``model.replica.write_interface`` writes it; benchmarks/gpu.sh prepares one), BENCH_GPU_ATTENTION
(``model.attention``: sdpa, or flash_attention_2 where flash-attn is installed).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_decode import benchmark_prompts, reference
from bench_train import PHASES, WAYS, examples_of, measure, synthetic_round, timed_step, trainer_for

from respect_hpc.config.schema import Hyperparameters, ModelSection, TrainingSection
from respect_hpc.core.rundir import TaskDir
from respect_hpc.data.datasets import validation_turns
from respect_hpc.domain.prompts import decoder_template
from respect_hpc.model.loading import load_text_model, load_tokenizer
from respect_hpc.model.replica import scaled_config, text_size, vision_size, write_interface
from respect_hpc.model.scorer import FeedbackScorer, shared_prefix_length
from respect_hpc.training.spec import TrainSpec
from respect_hpc.training.trainer import Trainer, peak_memory_gib

TINY = os.environ.get("BENCH_GPU_TINY") == "1"
RECORD = not TINY  # benchmarks/run.py records the section in RESULTS.md (not a TINY run's figures)
GAMES = int(os.environ.get("BENCH_GPU_GAMES", 4 if TINY else 48))
MICRO_BATCH = int(os.environ.get("BENCH_GPU_MICRO", 4))
TRAIN_S = float(os.environ.get("BENCH_GPU_TRAIN_S", 45))
PROMPTS = int(os.environ.get("BENCH_GPU_PROMPTS", 16 if TINY else 1000))
ZERO2_GAMES = int(os.environ.get("BENCH_GPU_ZERO2_GAMES", 2 if TINY else 24))
MEMORY_SWEEP = (2, 4) if TINY else (4, 8, 16)  # micro-batches (games) the memory part tries
SWEEP_S = float(os.environ.get("BENCH_GPU_SWEEP_S", 8))
ATTENTION = os.environ.get("BENCH_GPU_ATTENTION", "sdpa")  # model.attention (flash_attention_2 needs flash-attn)
CHUNK = 80  # prompts per alternation of the two decoders
PEAK_FLOPS = 989e12  # dense bf16, H100 SXM and H200


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(work) -> float:
    """Seconds ``work()`` takes, the device's queue drained before and after."""
    _sync()
    began = time.perf_counter()
    work()
    _sync()
    return time.perf_counter() - began


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _release() -> None:
    """Free what the last part left (its models), so that the next peak counts only its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _reset_peak()


def matmul_peak(device: str, dtype: str) -> float:
    """FLOP/s of back-to-back square matmuls in the benchmark's dtype: what this device reaches in practice,
    the second peak MFU is read against (an H200 gives about 790 of its 989 TFLOP/s)."""
    size, runs = (256, 3) if TINY else (8192, 50)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b, c = (torch.randn(size, size, device=device, dtype=kind) for _ in range(3))
    torch.mm(a, b, out=c)  # warm-up

    def work() -> None:
        for _ in range(runs):
            torch.mm(a, b, out=c)
    return 2 * size**3 * runs / _timed(work)


def interface(root: Path) -> Path:
    """IDEFICS2-8B's interface folder without weights (TINY: with a replica's widths and depths): a copy of
    BENCH_GPU_INTERFACE where set (a machine without mistral-common cannot rebuild the tokenizer), else
    rebuilt."""
    given = os.environ.get("BENCH_GPU_INTERFACE")
    folder = root / "idefics2-8b"
    if given:
        shutil.copytree(given, folder)
    else:
        write_interface("idefics2-8b", folder)
    if TINY:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(scaled_config(config, text_size(64, 2), vision_size(32, 2))))
    return folder


@contextlib.contextmanager
def random_weights(device: str):
    """Within the block, a folder without weights loads as a random-weight model built from its config on
    ``device`` (in the dtype asked for, with the folder's generation config, in eval mode as from_pretrained
    leaves it); a folder with weights loads as before."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    originals = {cls: cls.__dict__["from_pretrained"] for cls in (AutoModelForCausalLM, AutoModelForImageTextToText)}

    def patched(original):
        def from_pretrained(cls, path, *args, dtype=None, **kwargs):
            folder = Path(path)
            if any(folder.glob("*.safetensors")) or kwargs.get("gguf_file"):
                return original.__func__(cls, path, *args, dtype=dtype, **kwargs)
            with torch.device(device):
                model = cls.from_config(AutoConfig.from_pretrained(folder), dtype=dtype,
                                        attn_implementation=kwargs.get("attn_implementation"))
            model.generation_config = GenerationConfig.from_pretrained(folder)
            return model.eval()
        return classmethod(from_pretrained)

    for cls, original in originals.items():
        cls.from_pretrained = patched(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.from_pretrained = original


def text_parameters(model) -> int:
    """N: the text model's parameters without embeddings (and without LoRA's)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if "text_model." in n and "embed_tokens" not in n and "lora_" not in n)


def _text_parameters_of(folder: Path) -> int:
    """N of a model folder, counted on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return text_parameters(AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder)))


def train_section(folder: Path, images: Path, turns, feedback, root: Path, dtype: str, n: int) -> str:
    rows, notes = [], []
    for objective in ("fft", "rl"):
        examples = examples_of(turns, feedback, objective)
        _reset_peak()
        m = measure(examples, folder, images, root, objective, dtype=dtype, micro_batch=MICRO_BATCH,
                    attention=ATTENTION, sync=_sync,
                    budget_s=TRAIN_S)
        peak = peak_memory_gib()
        s, t, p, a = m["seconds"], m["tokens"], m["padded"], m["actions"]
        for way, name in WAYS.items():
            phases = m["phases"][way]
            share = " / ".join(f"{phases[k]:.3f}" for k in PHASES)
            rows.append(f"| {objective.upper()} | ({way}) {name} | {a[way] / s[way]:.2f} | {t[way] / s[way]:,.0f} | "
                        f"{p[way] / s[way]:,.0f} | {6 * n * t[way] / s[way] / PEAK_FLOPS:.3f} | "
                        f"{s['b'] / s[way]:.2f}x | {share} |")
        notes.append(f"{objective.upper()}: {m['slices']} of 8 slices in the budget, {examples.height} trained actions "
                     f"in {m['sequences']['turn']} turn or {m['sequences']['game']} game sequences, cache filled in "
                     f"{m['fill']:.1f} s; peak {peak:.1f} GiB with both trainers resident")
    table = "\n".join(rows)
    return f"""### Training: the four ways of bench_train, synchronized

Micro-batches of {MICRO_BATCH} sequences; {TRAIN_S:.0f} s of timed micro-batches per objective at most.
{"; ".join(notes)}.

| objective | way | trained actions/s | tokens/s | tokens/s with padding | MFU (6N) | vs (b) | one step: build / forward / backward / optimizer (s) |
|---|---|---|---|---|---|---|---|
{table}"""


KERNELS = {"matmul": ("gemm", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
           "attention": ("flash", "fmha", "attention", "attn")}  # by name: CUDA kernels, or aten ops on a CPU


def _kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNELS.items() if any(m in lowered for m in marks)), "other")


def profile_section(folder: Path, images: Path, turns, feedback, root: Path, dtype: str) -> str:
    """Two FFT micro-batches (game packing + cache) after an untimed one, under torch.profiler: the device's
    self time by kind of kernel and the top kernels (on a CPU: the aten ops' self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    examples = examples_of(turns, feedback, "fft")
    with trainer_for(examples, folder, images, root / "profile", "fft", "game", root / "cache", dtype, MICRO_BATCH,
                     ATTENTION) as trainer:
        trainer.model.train()
        batches = trainer.data.epoch(0, trainer.per_step)
        timed_step(trainer, batches[0], _sync)
        profiled = (batches[1:3] or batches)
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            wall = _timed(lambda: [timed_step(trainer, b, _sync) for b in profiled])
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(e.key, getattr(e, attribute), e.count) for e in prof.key_averages()
              if not cuda or e.device_type == DeviceType.CUDA]
    total = sum(t for _, t, _ in events) or 1
    kinds = {kind: sum(t for key, t, _ in events if _kind(key) == kind) for kind in (*KERNELS, "other")}
    split = ", ".join(f"{kind} {100 * t / total:.0f}%" for kind, t in kinds.items())
    top = sorted(events, key=lambda e: e[1], reverse=True)[:12]
    rows = "\n".join(f"| `{key[:90]}` | {_kind(key)} | {t / 1e3 / len(profiled):.1f} | {100 * t / total:.1f}% | "
                     f"{count // len(profiled)} |" for key, t, count in top)
    busy = f"busy {100 * total / 1e6 / wall:.0f}% of the wall time under the profiler" if cuda else "CPU self time"
    return f"""### Where a step's time goes: torch.profiler over FFT micro-batches

Game packing + cache, micro-batches of {MICRO_BATCH}, {len(profiled)} profiled after an untimed one;
{"device" if cuda else "CPU"} time {total / 1e6:.2f} s ({busy}): {split}.

| kernel or op | kind | ms a micro-batch | share | calls a micro-batch |
|---|---|---|---|---|
{rows}"""


def memory_section(folder: Path, images: Path, turns, feedback, root: Path, dtype: str, n: int) -> str:
    """FFT, game packing with the vision cache, at each micro-batch of MEMORY_SWEEP with and without gradient
    checkpointing: trained actions/s, MFU and peak memory, or where it runs out of memory."""
    examples = examples_of(turns, feedback, "fft")
    rows = []
    for checkpointing in (False, True):
        too_big = False
        for micro_batch in MEMORY_SWEEP:
            cell = f"| {micro_batch} | {'on' if checkpointing else 'off'} |"
            if too_big:
                rows.append(f"{cell} not tried (a smaller one ran out of memory) | | |")
                continue
            _release()
            try:
                with trainer_for(examples, folder, images, root / f"sweep-{micro_batch}-{checkpointing}", "fft",
                                 "game", root / "cache", dtype, micro_batch, ATTENTION,
                                 gradient_checkpointing=checkpointing) as trainer:
                    trainer.model.train()
                    batches = trainer.data.epoch(0, trainer.per_step)
                    timed_step(trainer, batches[0], _sync)  # warm-up, untimed
                    seconds = tokens = actions = 0
                    for batch_of in batches[1:] or batches:  # (the warm-up's again where it is the only one)
                        phases, batch = timed_step(trainer, batch_of, _sync)
                        seconds += sum(phases.values())
                        tokens += int(batch["attention_mask"].sum())
                        actions += trainer.data.answers([batch_of], 0)
                        if seconds > SWEEP_S:
                            break
                rows.append(f"{cell} {actions / seconds:.2f} | {6 * n * tokens / seconds / PEAK_FLOPS:.3f} | "
                            f"{peak_memory_gib():.1f} |")
            except torch.cuda.OutOfMemoryError:
                rows.append(f"{cell} out of memory | | {peak_memory_gib():.1f} |")
                too_big = True
    table = "\n".join(rows)
    return f"""### Memory: micro-batch and gradient checkpointing

FFT, game packing with the vision cache (filled in the training part), one trainer resident, up to {SWEEP_S:.0f} s of
timed micro-batches after an untimed one; peak memory since the trainer was built.

| micro-batch (games) | gradient checkpointing | trained actions/s | MFU (6N) | peak (GiB) |
|---|---|---|---|---|
{table}"""


def decode_section(folder: Path, dtype: str, device: str, n: int) -> str:
    spec = ModelSection(path=folder, dtype=dtype, attention=ATTENTION)
    model, tokenizer = load_text_model(spec, device), load_tokenizer(spec)
    template = decoder_template("respect-binary@2")
    prompts = benchmark_prompts(PROMPTS, tokenizer)
    _reset_peak()
    scorer = FeedbackScorer(model, tokenizer, template)
    ours_s = reference_s = 0.0
    for start in range(0, len(prompts), CHUNK):  # alternating, so that anything else on the node slows both alike
        chunk = prompts[start:start + CHUNK]
        ours_s += _timed(lambda: [s for batch in scorer.score(chunk) for s in batch])
        reference_s += _timed(lambda: reference(model, tokenizer, chunk, template.labels))
    once_s = _timed(lambda: [s for batch in scorer.score(prompts) for s in batch])
    rows = scorer.encode(prompts)
    prefix = shared_prefix_length(rows)
    suffixes = sum(len(r) - prefix for r in rows)
    chunks = -(-len(prompts) // CHUNK)
    bound = 256 / (suffixes / len(rows))
    return f"""### Decoding: the FeedbackScorer at its defaults against the reference decoder

{len(prompts):,} binary decoder prompts ({prefix}-token shared prefix, {min(map(len, rows))} to {max(map(len, rows))}
tokens); the token budget sized to the GPU ({scorer.batch_tokens:,} tokens a batch); peak {peak_memory_gib():.1f} GiB.

| decoder | examples/s | speed-up | MFU (2N x tokens run) |
|---|---|---|---|
| reference: generate 3 tokens, padded to 256, batches of 16, chunks of {CHUNK} | {len(prompts) / reference_s:.1f} | | |
| FeedbackScorer, chunks of {CHUNK} | {len(prompts) / ours_s:.1f} | {reference_s / ours_s:.2f}x | {2 * n * (suffixes + chunks * prefix) / ours_s / PEAK_FLOPS:.3f} |
| FeedbackScorer, one call | {len(prompts) / once_s:.1f} | {reference_s / once_s:.2f}x | {2 * n * (suffixes + prefix) / once_s / PEAK_FLOPS:.3f} |

The token bound (the reference's 256 tokens a prompt over the scorer's suffix) is {bound:.2f}x."""


def zero2_section(folder: Path, images: Path, root: Path, dtype: str) -> str:
    _, _, turns, feedback = synthetic_round(root / "zero2-data", ZERO2_GAMES)
    examples = examples_of(turns, feedback, "fft")
    hp = Hyperparameters(micro_batch=MICRO_BATCH, effective_batch=MICRO_BATCH, warmup_steps=0, epochs=1)
    spec = TrainSpec(objective="fft", hp=hp, seed=1,
                     model=ModelSection(path=folder, dtype=dtype, attention=ATTENTION),
                     policy_template="respect-listener@1", images=images, out=TaskDir(root / "zero2"),
                     training=TrainingSection(zero_stage=2, packing="game"), vision_cache=root / "zero2-cache")
    validation = validation_turns(turns, limit=2 * MICRO_BATCH)
    lines: list[str] = []
    _reset_peak()
    began = time.perf_counter()
    with Trainer(spec, examples, validation) as trainer:
        built = time.perf_counter() - began
        began = time.perf_counter()
        status = trainer.run(progress=lines.append)
        ran = time.perf_counter() - began
        steps, waited = trainer.epoch_start[-1], trainer.waited
    assert status == "finished", status
    return f"""### A ZeRO-2 task: Trainer.run with DeepSpeed ZeRO-2, one process

FFT, one epoch of {ZERO2_GAMES} games ({examples.height} trained actions, {steps} steps of {MICRO_BATCH} game
sequences), vision cache, validation on {validation.height} turns and the adapter's checkpoint included.

| engine and model built (s) | run (s) | trained actions/s over the run | waiting for micro-batches (s) | peak (GiB) |
|---|---|---|---|---|
| {built:.1f} | {ran:.1f} | {examples.height / ran:.2f} | {waited:.2f} | {peak_memory_gib():.1f} |

Its last lines: {" / ".join(lines[-2:])}"""


def main() -> str:
    if not (TINY or torch.cuda.is_available()):
        raise SystemExit("bench gpu: no CUDA device here; run it on a GPU node (BENCH_GPU_TINY=1 runs the same code "
                         "paths on a tiny model on this CPU without recording figures)")
    device, dtype = ("cuda", "bf16") if torch.cuda.is_available() and not TINY else ("cpu", "fp32")
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    folder = interface(root)
    n = _text_parameters_of(folder)
    bank, images, turns, feedback = synthetic_round(root, GAMES)
    peak = matmul_peak(device, dtype)
    parts = []
    with random_weights(device):
        for title, section in (
                ("Training", lambda: train_section(folder, images, turns, feedback, root, dtype, n)),
                ("Where a step's time goes", lambda: profile_section(folder, images, turns, feedback, root, dtype)),
                ("Memory", lambda: memory_section(folder, images, turns, feedback, root, dtype, n)),
                ("Decoding", lambda: decode_section(folder, dtype, device, n)),
                ("A ZeRO-2 task", lambda: zero2_section(folder, images, root, dtype))):
            try:
                parts.append(section())
            except Exception as error:  # one part's failure must not lose the figures of the others
                traceback.print_exc()
                first = (str(error).strip().splitlines() or [""])[0]
                parts.append(f"### {title} failed: {type(error).__name__}: {first}")
            print(parts[-1], file=sys.stderr, flush=True)  # in the log as it comes, should a later part crash
            _release()
    import transformers

    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (BENCH_GPU_TINY: the figures mean nothing)"
    body = "\n\n".join(parts)
    heading = f"GPU: IDEFICS2-8B size, random weights, {dtype}, {ATTENTION} attention, one GPU"
    return f"""## {heading} (issue: fast on a GPU node)

{name}; torch {torch.__version__}, transformers {transformers.__version__}; N = {n / 1e9:.2f} B text parameters
without embeddings; {GAMES} synthetic games ({turns.height} turns, {bank.source} images). MFU against 989 TFLOP/s
(dense bf16): 6N per trained token, 2N per decoded token. Square matmuls ran at {peak / 1e12:.1f} TFLOP/s here:
against that practical peak, MFU is {PEAK_FLOPS / peak:.2f}x the figures below.

{body}"""
