"""Command line: python -m vorta_ops {demo,convert,inspect} ...

Every refused argument ends the same way: one line on stderr starting with "error: " that says
what was wrong and what to do, exit code 2, no traceback, and no file written or changed.
"""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one "error: ..." line (no usage block)."""

    def error(self, message: str):
        hint = f"see '{self.prog} --help'"
        self.exit(2, f"error: {_one_line(message)} ({hint})\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _triple_type(what: str, odd: bool = False):
    example = "3,3,3" if odd else "8,16,24"

    def parse(s: str):
        parts = s.replace("x", ",").split(",")
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            vals = ()
        if len(vals) != 3 or len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three integers like {example} for the {what}, got {s!r}")
        if any(v < 1 for v in vals):
            raise argparse.ArgumentTypeError(f"the {what} must be three positive integers like {example}, got {s!r}")
        if odd and any(v % 2 == 0 for v in vals):
            raise argparse.ArgumentTypeError(
                f"the {what} must be odd on every axis (a centre tile plus equal sides), got {s!r}; use e.g. 3,3,3"
            )
        return vals

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _positive_int(label: str, even: bool = False):
    """label: what the number is, e.g. "the number of heads"."""

    def parse(s: str):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{label} must be a whole number, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{label} must be at least 1, got {v}")
        if even and v % 2:
            raise argparse.ArgumentTypeError(f"{label} must be even (cos/sin feature pairs), got {v}; use e.g. 64")
        return v

    parse.__name__ = label
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m vorta_ops", description="VORTA routed sparse attention tools")
    sub = p.add_subparsers(dest="cmd", metavar="{demo,convert,inspect}", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="routed attention on a built-in synthetic video; writes the routing picture")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--grid", type=_triple_type("grid"), default=(8, 16, 24), help="token grid T,H,W (default 8,16,24)")
    d.add_argument("--tile", type=_triple_type("tile"), default=(2, 4, 4), help="sliding tile T,H,W (default 2,4,4)")
    d.add_argument("--window", type=_triple_type("window", odd=True), default=(3, 3, 3),
                   help="window in tiles, odd (default 3,3,3)")
    d.add_argument("--heads", type=_positive_int("the number of heads"), default=8)
    d.add_argument("--head-dim", type=_positive_int("the head dim", even=True), default=64)
    d.add_argument("--blocks", type=_positive_int("the number of blocks"), default=12)
    d.add_argument("--steps", type=_positive_int("the number of steps"), default=10)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c = sub.add_parser("convert", help="official router checkpoint (.pt) -> vorta safetensors")
    c.add_argument("src", help="the official router checkpoint (router.pt)")
    c.add_argument("dst", help="the file to write; must end in .safetensors")
    c.add_argument("--config", default=None, help="the official train config.json, kept in the metadata")
    c.add_argument("--force", action="store_true", help="overwrite dst when it exists")
    i = sub.add_parser("inspect", help="print what a router file holds")
    i.add_argument("path")
    return p


def main(argv=None) -> int:
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:  # usage error (one line already on stderr) or --help
        return e.code if isinstance(e.code, int) else 2

    from .router_io import RouterFileError, convert_router, load_router

    try:
        if a.cmd == "demo":
            from .demo import run_demo

            run_demo(a.out, a.grid, a.heads, a.head_dim, a.blocks, a.steps, a.tile, a.window, a.device)
        elif a.cmd == "convert":
            r = convert_router(a.src, a.dst, a.config, overwrite=a.force)
            print(f"wrote {a.dst}: {r.describe()}")
        else:
            r = load_router(a.path)
            print(r.describe())
            print(f"dtype {r.weight.dtype}; blocks {r.block_names[0]} .. {r.block_names[-1]}")
            for key, val in r.meta.items():
                print(f"  {key}: {val}")
    except (RouterFileError, ValueError, OSError) as e:
        print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
