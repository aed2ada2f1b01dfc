#!/usr/bin/env bash
# The one prepared GPU session (issue 15): install the carried wheels, run the gpu-marked
# kernel tests, then the kernel benchmark, each under a hard time limit; JSON / logs to $OUT.
#
# Here (CPU machine, once):  python3 -m pip download --no-deps --only-binary=:all: \
#   --python-version 3.12 --implementation cp -d .whl ml_collections tensorboardX
#   (and `echo /.whl/ >> .git/info/exclude`)
# There (device `run`, carry [".whl"]):  bash scripts/bench/gpu_check.sh
# The GPU image already has jax, flax, optax, orbax-checkpoint, jaxtyping, absl-py, pytest,
# hypothesis and the rest of the dependencies; only the two above travel.
set -uo pipefail
OUT="${OUT:-results/gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
timeout 240 python3 -m pytest -q -m "gpu" -p no:cacheprovider tests/pallas_kernels \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
timeout 120 python3 -m scripts.bench.autotune_kernels --shapes=4096x4096,4096x14336 \
  --m=1,16,128 --iters=10 --table="$OUT/tuned_blocks.json" 2>&1 | tail -20 | tee "$OUT/autotune.log"
timeout 300 python3 -m scripts.bench.kernels --iters=10 --out="$OUT/bench_kernels" 2>&1 \
  | tail -60 | tee "$OUT/bench.log"
