#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with CUDA (a few minutes):
#   bash benchmarks/gpu_check.sh [OUT]      # OUT: where the logs go (default runs/gpu-check)
# 1. the CUDA tests (heads, auxiliary losses, OTFace, the trainer with bf16 autocast),
# 2. the heads' CUDA benchmark at a small size (fp32 and bf16),
# 3. notebooks 00 and 08 at their smoke parameters on the GPU.
# It installs nothing beyond `workbook.py env`, with FRLAB_TORCH naming a CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
mkdir -p "$out"
py=.venv/bin/python
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.version.cuda)" \
    | tee -a "$out/gpu.txt" || exit 2
$py -m pytest tests/test_cuda.py tests/test_heads.py -k "cuda or CUDA or otface" -q -rs 2>&1 | tee "$out/tests.log" \
    | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1
$py benchmarks/run.py --quick --only cuda 2>&1 | tee "$out/bench.log" | tail -12
for nb in 00_quickstart 08_otface; do
    $py -m frlab run "$nb" --smoke -p device cuda --out "$out/runs" 2>&1 | grep -v "without encryption" \
        | tee "$out/$nb.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
