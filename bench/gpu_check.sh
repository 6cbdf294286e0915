#!/usr/bin/env bash
# GPU checks, from the repository root of a machine with CUDA: the gpu-marked tests (the
# engine and a Serve replica on the GPU, bfloat16) and the engine throughput benchmark.
# Where no packages can be installed, wheels carried in .whl/ are used (see README) and
# .gpu/smollm2-config holds the embedded model's config and tokenizer (no weights).
set -uo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
CONFIG=${GPU_CHECK_CONFIG:-$PWD/.gpu/smollm2-config}
export TEXTGEN_TEST_TOKENIZER=$CONFIG
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
echo "== gpu tests"
timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tail -15
echo "== engine throughput"
timeout 300 python3 bench/gpu_throughput.py --config "$CONFIG" ${GPU_THROUGHPUT_ARGS:-}
