"""bench/e2e.py's bookkeeping (the benchmark itself needs a GPU): which model and EasyCache threshold a
method runs, and which earlier rows a run replaces."""
import pytest

from bench.e2e import _row_key, easycache_kind, merge_rows


@pytest.mark.parametrize("kind,want", [
    ("easycache", (None, 0.2)),
    ("easycache@1.5", (None, 1.5)),
    ("mix official + easycache", ("mix official", 0.2)),
    ("mix official + easycache@0.5", ("mix official", 0.5)),  # a threshold on top of VORTA reaches EasyCache
])
def test_easycache_kind(kind, want):
    assert easycache_kind(kind) == want


def test_a_longer_run_sits_beside_the_short_one_and_a_repeat_replaces_it():
    row = dict(model="m", variant="random", method="dense cuDNN SDPA", steps=4, blocks_run=8, s_per_step=1.0)
    longer = {**row, "steps": 20, "s_per_step": 2.0}
    fewer_blocks = {**longer, "blocks_run": 4}
    repeat = {**row, "s_per_step": 3.0}
    out = merge_rows([row], [longer, fewer_blocks, repeat])
    assert [r["s_per_step"] for r in out] == [3.0, 2.0, 2.0]
    assert len({_row_key(r) for r in out}) == 3
