"""Command line: python -m vorta_ops {demo,convert,inspect} ..."""
from __future__ import annotations

import argparse
import sys


def _triple(s: str):
    parts = s.replace("x", ",").split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers like 8,16,24, got {s!r}")
    return tuple(int(p) for p in parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vorta_ops", description="VORTA routed sparse attention tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="routed attention on a built-in synthetic video; writes the routing picture")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--grid", type=_triple, default=(8, 16, 24), help="token grid T,H,W (default 8,16,24)")
    d.add_argument("--tile", type=_triple, default=(2, 4, 4), help="sliding tile T,H,W (default 2,4,4)")
    d.add_argument("--window", type=_triple, default=(3, 3, 3), help="window in tiles (default 3,3,3)")
    d.add_argument("--heads", type=int, default=8)
    d.add_argument("--head-dim", type=int, default=64)
    d.add_argument("--blocks", type=int, default=12)
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c = sub.add_parser("convert", help="official router checkpoint (.pt) -> vorta safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--config", default=None, help="the official train config.json, kept in the metadata")
    i = sub.add_parser("inspect", help="print what a router file holds")
    i.add_argument("path")
    a = p.parse_args(argv)

    from .router_io import RouterFileError, convert_router, load_router

    try:
        if a.cmd == "demo":
            from .demo import run_demo

            run_demo(a.out, a.grid, a.heads, a.head_dim, a.blocks, a.steps, a.tile, a.window, a.device)
        elif a.cmd == "convert":
            r = convert_router(a.src, a.dst, a.config)
            print(f"wrote {a.dst}: {r.describe()}")
        else:
            r = load_router(a.path)
            print(r.describe())
            print(f"dtype {r.weight.dtype}; blocks {r.block_names[0]} .. {r.block_names[-1]}")
            for key, val in r.meta.items():
                print(f"  {key}: {val}")
    except (RouterFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
