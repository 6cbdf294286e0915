#!/usr/bin/env bash
# GPU checks, from the repository root of a machine with CUDA: the gpu-marked tests (the
# engine's CUDA graphs against its eager paths, a Serve replica on the GPU where Ray is
# installed) and the engine throughput benchmark. Exits non-zero when a test fails.
# Where no packages can be installed, wheels carried in .whl/ are used (see README) and
# .gpu/smollm2-config holds the embedded model's config and tokenizer (no weights).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    # Carried wheels first; if their transformers does not import with the machine's
    # other packages, the machine's own transformers is used (the engine runs on 5.1x too).
    if PYTHONPATH=/tmp/site:$PWD python3 -c "import transformers, pydantic" 2>/dev/null; then
        export PYTHONPATH=/tmp/site:$PWD
    else
        rm -rf /tmp/site/transformers /tmp/site/tokenizers
        export PYTHONPATH=/tmp/site:$PWD
    fi
fi
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
CONFIG=${GPU_CHECK_CONFIG:-$PWD/.gpu/smollm2-config}
OUT=${OUT:-bench/results}
export TEXTGEN_TEST_TOKENIZER=$CONFIG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== gpu tests"
timeout "${GPU_TESTS_TIMEOUT_S:-240}" python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 \
    | tee /tmp/gpu_tests.log | tail -40
tests=${PIPESTATUS[0]}
if [ "$tests" -eq 0 ] && ! grep -Eq "[0-9]+ passed" /tmp/gpu_tests.log; then
    echo "no GPU test ran (all skipped: no CUDA?); that is a failure here"
    tests=1
fi
echo "== engine throughput"
timeout "${GPU_BENCH_TIMEOUT_S:-600}" python3 bench/gpu_throughput.py --config "$CONFIG" --out "$OUT/gpu_throughput.json" ${GPU_THROUGHPUT_ARGS:-}
bench=$?
echo "tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
