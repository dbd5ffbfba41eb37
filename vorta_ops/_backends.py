"""Backend registries of the branches: a name -> implementation map, and which of them write
into a caller's ``out=`` view themselves (the others' results are copied into it)."""
from __future__ import annotations


class BackendRegistry:
    def __init__(self, branch: str, **backends):
        self.branch = branch
        self.fns = dict(backends)
        self.writes_out: set[str] = set()

    def register(self, name: str, fn, writes_out: bool = False) -> None:
        self.fns[name] = fn
        if writes_out:
            self.writes_out.add(name)

    def call(self, name: str, requested: str, q, k, v, *args, out=None, **kwargs):
        if name not in self.fns:
            raise ValueError(f"unknown {self.branch} backend {requested!r}; available: {sorted(self.fns)} or 'auto'")
        if out is not None and name in self.writes_out:
            return self.fns[name](q, k, v, *args, out=out, **kwargs)
        res = self.fns[name](q, k, v, *args, **kwargs)
        return res if out is None else out.copy_(res)
