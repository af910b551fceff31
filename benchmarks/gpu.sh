#!/usr/bin/env bash
# The GPU benchmark (benchmarks/bench_gpu.py) on a bare GPU machine: one without the project's packages and
# without network. On a GPU node where the project is installed, `python benchmarks/run.py gpu` is enough.
#
#   bash benchmarks/gpu.sh prepare    here (with network), from the checkout's root: lays the ignored gpu/ folder
#                                     with ../shared/tools/gpu-check/prepare.sh (wheels of polars, submitit,
#                                     pydantic and deepspeed) and adds wheels of transformers at the declared floor,
#                                     huggingface_hub and safetensors that it needs (such a machine may have an
#                                     older transformers); KiloGram travels only where everything fits 64 MiB
#   bash benchmarks/gpu.sh            there, with gpu/ sent along: installs gpu/whl into $SITE where the python
#                                     lacks a package or has an older transformers, runs `benchmarks/run.py gpu`
#                                     (about 6 minutes at IDEFICS2-8B size), and copies benchmarks/RESULTS.md and
#                                     the log to $OUT, whose files come back
#
# Env: PY (the python: /opt/torch/.venv/bin/python3 where it exists, else python3), SITE (/tmp/site),
#      OUT (/tmp/gpu-out), and bench_gpu.py's knobs (BENCH_GPU_*).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FLOOR=$(sed -nE 's/.*"transformers>=([0-9.]+)".*/\1/p' pyproject.toml)
EXTRA="transformers==$FLOOR.0 huggingface_hub==1.33.0 safetensors==0.8.0"  # the floor and what it imports

if [ "${1:-}" = prepare ]; then
    mkdir -p gpu/whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d gpu/whl $EXTRA
    if [ ! -f gpu/interface/config.json ]; then  # the benchmark's model interface (the tokenizer needs
                                                 # mistral-common, which such a machine lacks); prepare.sh's own
                                                 # interface step looks for an older module path
        rm -rf gpu/interface.part
        PYTHONPATH=$PWD .venv/bin/python -c "import sys; from respect_hpc.model.replica import write_interface; \
write_interface('idefics2-8b', sys.argv[1])" gpu/interface.part
        mv gpu/interface.part gpu/interface
    fi
    KILOGRAM_SRC=${KILOGRAM_SRC:-/nonexistent} bash ../shared/tools/gpu-check/prepare.sh
    echo "gpu.sh: ready; on the GPU machine: bash benchmarks/gpu.sh (send gpu/ along; allow it 480 s)"
    exit 0
fi

PY=${PY:-$(command -v /opt/torch/.venv/bin/python3 || command -v python3)}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/bench-gpu.log") 2>&1
if ! PYTHONPATH=$PWD "$PY" -c "import polars, submitit, pydantic, deepspeed; \
from respect_hpc.model.loading import check_transformers; check_transformers()" 2>/dev/null; then
    [ -d gpu/whl ] || { echo "gpu.sh: packages missing and no gpu/whl: run 'bash benchmarks/gpu.sh prepare' first"; exit 1; }
    echo "gpu.sh: installing gpu/whl into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" gpu/whl/*.whl
    if [ -f gpu/whl/polars-rt.tar.xz ]; then
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
            gpu/whl/polars-rt.tar.xz "$SITE"
    fi
    export PYTHONPATH=$SITE
fi
[ -f gpu/interface/config.json ] && export BENCH_GPU_INTERFACE=$PWD/gpu/interface  # (no mistral-common there)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
"$PY" benchmarks/run.py gpu || status=$?
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
