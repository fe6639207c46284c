#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with CUDA, torch and transformers but no
# network (the tool library's device machine): the CUDA checks of scripts/gpu_check.py, then
# `refreekv bench` on the real SmolLM2-135M on CUDA in float32 and bfloat16.
#
# The packaged model is a 94 MB GGUF, more than one device call carries, so it travels in two
# halves under .gpu/ (ignored by git): .gpu/a/smol.gguf.part-00 in a first call and
# .gpu/b/smol.gguf.part-01 (+ .gpu/wheels: gguf, needlehaystack) in the second. Make them with:
#   mkdir -p .gpu/a .gpu/b .gpu/wheels && split -n 2 -d "$GGUF" .gpu/smol.gguf.part- &&
#   mv .gpu/smol.gguf.part-00 .gpu/a/ && mv .gpu/smol.gguf.part-01 .gpu/b/ &&
#   pip download --no-deps -d .gpu/wheels gguf==0.19.0 needlehaystack==0.1.0
# Results land in $OUT (default ./results): gpu_check.*, bench_cuda_float32.*, bench_cuda_bfloat16.*.
set -euo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING || true
cat .gpu/a/smol.gguf.part-00 .gpu/b/smol.gguf.part-01 > /tmp/smol.gguf
if [ -f .gpu/b/smol.gguf.sha256 ]; then
  echo "$(cat .gpu/b/smol.gguf.sha256)  /tmp/smol.gguf" | sha256sum -c -
fi
export REFREEKV_GGUF=/tmp/smol.gguf REFREEKV_CACHE=/tmp/refreekv-cache PYTHONUNBUFFERED=1
python3 scripts/gpu_check.py --out "$OUT"
for dtype in float32 bfloat16; do
  python3 -m refreekv.cli bench --device cuda --dtype "$dtype" --lengths "${LENGTHS:-1024,2048,4096,8192}" \
    --synthetic "${SYNTHETIC:-}" --mlx-lengths "" --out "$OUT/$dtype"
  for f in "$OUT/$dtype"/bench.*; do mv "$f" "$OUT/bench_cuda_${dtype}.${f##*.}"; done
  rmdir "$OUT/$dtype"
done
