#!/usr/bin/env bash
# Nsight Compute profile of the attention kernels (GPU machine). Writes $OUT_DIR/ncu-<shape>.txt:
# a per-kernel summary and the details page (speed of light, warp states, pipelines, memory).
# Usage: bash bench/profile.sh [shape] [out_dir]
set -uo pipefail
shape=${1:-wan14b-720p}; out=${2:-bench/results}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$ncu" ]; then echo "ncu not found"; exit 1; fi
"$ncu" --version | tail -1
rep="$out/ncu-$shape"
"$ncu" --profile-from-start off --target-processes all --nvtx --set detailed --import-source no \
  -f -o "$rep" python -m bench.profile_kernels --shape "$shape" 2>&1 | tail -20
"$ncu" --import "$rep.ncu-rep" --page details --print-nvtx-rename kernel > "$rep.txt" 2>&1 || \
  "$ncu" --import "$rep.ncu-rep" --page details > "$rep.txt" 2>&1
"$ncu" --import "$rep.ncu-rep" --print-summary per-kernel >> "$rep.txt" 2>&1
rm -f "$rep.ncu-rep"
wc -l "$rep.txt"
