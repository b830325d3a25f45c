#!/usr/bin/env bash
# The GPU figures bench/RESULTS.md lacks, in one run of about 8 minutes on one GPU, into OUT (default bench-gpu):
#   matrix.json / matrix.log   bench/gpu.py: fp16/bf16 x tiling off/on x batch 1/2/4, then torch.compile
#   null_vae.log               bench/encode.py --null-vae: the pipeline around the VAE, with this machine's cores
#   full.log                   bench/encode.py --full: the whole pipeline against the naive fp32 loop, full size
# Each step has its own time limit, so one that hangs leaves the others' figures. PYTHON picks the interpreter;
# TINY=1 runs every step with the tiny VAE config and few clips (a smoke run on a CPU: tests/test_bench.py).
#   bash bench/gpu.sh /tmp/gpu-figures
set -u
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
matrix=() clips=(--clips 64) full=(--clips 16)
if [[ -n "${TINY:-}" ]]; then
    matrix=(--tiny --dtypes bf16 --batches 1,2 --calls 1) clips=(--tiny --clips 4) full=(--tiny --clips 2)
fi
export PYTHONUNBUFFERED=1
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')" 2>&1 | tee "$out/device.log"
timeout 330 "$python" bench/gpu.py --json "$out/matrix.json" --budget-s 240 "${matrix[@]}" 2>&1 | tee "$out/matrix.log"
timeout 90 "$python" bench/encode.py --null-vae --vae-seconds 0.3 "${clips[@]}" 2>&1 | tee "$out/null_vae.log"
timeout 150 "$python" bench/encode.py --full "${full[@]}" 2>&1 | tee "$out/full.log"
echo "figures in $out"
