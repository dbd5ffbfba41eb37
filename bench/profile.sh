#!/usr/bin/env bash
# Nsight Compute profile of the attention kernels (GPU machine). Writes $OUT_DIR/ncu-<shape>.txt:
# the details page per kernel (speed of light, pipelines, memory, occupancy, scheduler, warp stall
# reasons) and a per-kernel summary.
# Usage: bash bench/profile.sh [shape] [out_dir] [fp8]
#   fp8: the aligned sliding tile in bf16 and in fp8 only (bench.profile_kernels --fp8), as ncu-fp8-<shape>.*
set -uo pipefail
shape=${1:-wan14b-720p}; out=${2:-bench/results}; mode=${3:-}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$ncu" ]; then echo "ncu not found"; exit 1; fi
"$ncu" --version | tail -1
args=(--shape "$shape"); rep="$out/ncu-$shape"
labels="dense cuDNN SDPA,sliding tile official (Triton),sliding tile aligned (Triton),core-set select+gather,core-set SDPA (cuDNN),core-set expand"
if [ "$mode" = fp8 ]; then args+=(--fp8); rep="$out/ncu-fp8-$shape"; labels=""; fi  # kernel names: the fp8 call launches several
secs=""
for s in SpeedOfLight ComputeWorkloadAnalysis MemoryWorkloadAnalysis LaunchStats Occupancy SchedulerStats WarpStateStats; do
  secs="$secs --section $s"
done
"$ncu" --profile-from-start off --target-processes all --nvtx $secs --import-source no \
  -f -o "$rep" python -m bench.profile_kernels "${args[@]}" 2>&1 | tail -20
"$ncu" --import "$rep.ncu-rep" --page details --print-nvtx-rename kernel > "$rep.txt" 2>&1 || \
  "$ncu" --import "$rep.ncu-rep" --page details > "$rep.txt" 2>&1
"$ncu" --import "$rep.ncu-rep" --print-summary per-kernel >> "$rep.txt" 2>&1
# raw stall reasons (warps stalled per issued instruction) and tensor-pipe use, per kernel
"$ncu" --import "$rep.ncu-rep" --page raw --csv 2>/dev/null | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
head, units, data = rows[0], rows[1], rows[2:]
keep = [i for i, h in enumerate(head) if "issue_stalled" in h and h.endswith("per_issue_active.ratio") or "pipe_tensor" in h or h in ("Kernel Name", "gpu__time_duration.sum")]
for r in data:
    print("; ".join(f"{head[i]}={r[i]}" for i in keep if r[i] not in ("", "0")))
' > "$rep-stalls.txt" 2>&1
python -m bench.ncu_summary "$rep-stalls.txt" ${labels:+"$labels"} > "$rep-summary.md"
rm -f "$rep.ncu-rep"
wc -l "$rep.txt"
