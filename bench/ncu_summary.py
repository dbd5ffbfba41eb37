"""Markdown table from bench/profile.sh's raw per-kernel metrics (key=value; ... lines):
duration, tensor-pipe use and warp stall reasons (cycles stalled per issued instruction).

    python -m bench.ncu_summary RAW.txt [comma-separated labels, in launch order] > summary.md
"""
from __future__ import annotations

import sys

STALLS = ("barrier", "wait", "mio_throttle", "long_scoreboard", "short_scoreboard", "dispatch_stall",
          "math_pipe_throttle", "not_selected", "lg_throttle", "no_instruction", "membar", "tex_throttle")
PRE, POST = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def parse(lines):
    for line in lines:
        kv = dict(part.strip().split("=", 1) for part in line.split(";") if "=" in part)
        if "Kernel Name" in kv:
            yield kv


def table(records, labels=None) -> str:
    head = ["kernel", "ms", "tensor pipe % active"] + [s.replace("_", " ") for s in STALLS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, kv in enumerate(records):
        name = labels[i] if labels and i < len(labels) else kv["Kernel Name"][:40]
        row = [name, f"{float(kv.get('gpu__time_duration.sum', 'nan')):.2f}",
               f"{float(kv.get('sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active', 'nan')):.1f}"]
        row += [f"{float(kv.get(PRE + s + POST, 0)):.2f}" for s in STALLS]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        recs = list(parse(f))
    print(table(recs, argv[1].split(",") if len(argv) > 1 else None))


if __name__ == "__main__":
    main()
