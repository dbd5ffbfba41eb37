"""The branch table (vorta_ops.branches): consistent, and what every reader of it sees."""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vorta_ops import branches as BR
from vorta_ops.branches import BRANCH_COLOURS, BRANCH_NAMES, BRANCHES, N_BRANCHES, branch, relative_work
from vorta_ops.coreset import CoresetConfig
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.sliding_tile import SlidingTileConfig


def test_ids_are_positions_names_and_labels_unique():
    assert N_BRANCHES == len(BRANCHES) >= 1
    assert [b.id for b in BRANCHES] == list(range(N_BRANCHES))
    assert len(set(BRANCH_NAMES)) == N_BRANCHES and len({b.label for b in BRANCHES}) == N_BRANCHES
    assert BRANCH_NAMES == tuple(b.name for b in BRANCHES)
    for b in BRANCHES:
        assert re.fullmatch(r"[a-z_]+", b.name), b.name  # router files' branch_order is comma-separated
        assert re.fullmatch(r"#[0-9a-f]{6}", b.hex) and tuple(int(b.hex[i:i + 2], 16) for i in (1, 3, 5)) == b.colour


def test_official_order_and_aliases():
    """The official order (0 full, 1 core-set, 2 sliding tile), and the old names still import."""
    from vorta_ops import router, viz

    assert BRANCH_NAMES == ("full", "coreset", "sliding_tile")
    assert (router.FULL, router.CORESET, router.SLIDING) == (BR.FULL, BR.CORESET, BR.SLIDING) == (0, 1, 2)
    assert router.BRANCH_NAMES == BRANCH_NAMES
    assert viz.BRANCH_COLORS == BRANCH_COLOURS and viz.BRANCH_LABELS == tuple(b.label for b in BRANCHES)


def test_lookup_by_id_name_label_tensor():
    for b in BRANCHES:
        assert branch(b.id) is branch(b.name) is branch(b.label) is branch(torch.tensor(b.id, dtype=torch.int8)) is b
    for bad in (-1, N_BRANCHES, "dense", True, 1.0, None):
        with pytest.raises(ValueError, match="unknown branch"):
            branch(bad)


# ---- colours ---------------------------------------------------------------------------------

def _lab(rgb) -> np.ndarray:
    """sRGB (0..255) -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=float) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return _lab_linear(lin)


def _lab_linear(lin) -> np.ndarray:
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = np.asarray(lin) @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# Machado et al. 2009, severity 1, on linear RGB
_CVD = {
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
}


def test_colours_distinct_and_distinguishable():
    assert len(set(BRANCH_COLOURS)) == N_BRANCHES
    lab = _lab(BRANCH_COLOURS)
    for i, j in itertools.combinations(range(N_BRANCHES), 2):
        assert np.linalg.norm(lab[i] - lab[j]) >= 40, (BRANCHES[i].name, BRANCHES[j].name)
    # the two common colour-vision deficiencies still tell every pair apart
    c = np.asarray(BRANCH_COLOURS, dtype=float) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    for kind, m in _CVD.items():
        sim = _lab_linear(np.clip(lin @ np.array(m).T, 0, 1))
        for i, j in itertools.combinations(range(N_BRANCHES), 2):
            assert np.linalg.norm(sim[i] - sim[j]) >= 30, (kind, BRANCHES[i].name, BRANCHES[j].name)
    # and every colour stands out from the backgrounds it is drawn on (picture: white, grey lines;
    # widget: #222) and from the widget's "unknown branch" black
    for bg in ((255, 255, 255), (200, 200, 200), (0x22, 0x22, 0x22), (0, 0, 0)):
        for b in BRANCHES:
            assert np.linalg.norm(_lab(b.colour) - _lab(bg)) >= 30, (b.name, bg)


# ---- configs and references ------------------------------------------------------------------

def test_config_types_construct():
    assert branch("full").config_type is None and branch("full").default_config() is None
    assert branch("coreset").config_type is CoresetConfig and branch("sliding_tile").config_type is SlidingTileConfig
    for b in BRANCHES:
        if b.config_type is not None:
            assert isinstance(b.default_config(), b.config_type)
            assert isinstance(getattr(RoutedConfig(), b.config_key), b.config_type)  # dispatch's field
            assert hasattr(RoutedConfig(), f"{b.config_key}_backend")


GRID = (2, 6, 4)
TINY = {"coreset": CoresetConfig(), "sliding_tile": SlidingTileConfig((1, 3, 2), (1, 1, 1))}


def _qkv(n_prefix=0, n_suffix=0, B=2, H=2, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = n_prefix + math.prod(GRID) + n_suffix
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("b", BRANCHES, ids=BRANCH_NAMES)
@pytest.mark.parametrize("extras", [(0, 0), (2, 3)])
def test_reference_runs_on_tiny_inputs(b, extras):
    q, k, v = _qkv(*extras)
    cfg = TINY.get(b.name)
    out = b.reference(q, k, v, GRID, cfg, *extras)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    # masked keys never count
    kv_mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
    kv_mask[1, -2:] = False
    masked = b.reference(q, k, v, GRID, cfg, *extras, kv_mask=kv_mask)
    assert torch.allclose(masked[0], out[0], atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -2:] += 5.0
    v2[1, :, -2:] -= 7.0
    assert torch.allclose(b.reference(q, k2, v2, GRID, cfg, *extras, kv_mask=kv_mask), masked, atol=1e-5)


def test_references_agree_where_the_branches_are_dense():
    """Every branch is full attention when it keeps every token / visits every tile."""
    q, k, v = _qkv(1, 2)
    dense = F.scaled_dot_product_attention(q, k, v)
    all_of = {"full": None, "coreset": CoresetConfig(keep_ratio=1.0),
              "sliding_tile": SlidingTileConfig((1, 3, 2), (3, 3, 3))}
    for b in BRANCHES:
        assert torch.allclose(b.reference(q, k, v, GRID, all_of[b.name], 1, 2), dense, atol=1e-5), b.name


@pytest.mark.parametrize("b", [b for b in BRANCHES if b.differentiable], ids=lambda b: b.name)
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the core-set loop reference
def test_differentiable_branches_have_autograd_on_cpu(b):
    """The branch's CPU path through dispatch back-propagates into q, k and v, with the
    reference's gradients."""
    cfg = RoutedConfig(**{b.config_key: TINY[b.name]}) if b.config_key else RoutedConfig()
    grads = []
    for fn in (lambda q, k, v: routed_attention(q, k, v, [b.id] * q.shape[1], GRID, cfg, 1, 2),
               lambda q, k, v: b.reference(q, k, v, GRID, TINY.get(b.name), 1, 2)):
        qkv = [x.requires_grad_() for x in _qkv(1, 2, dtype=torch.float64)]
        fn(*qkv).square().sum().backward()
        grads.append([x.grad for x in qkv])
    for got, want in zip(*grads):
        assert got is not None and got.abs().sum() > 0 and torch.allclose(got, want, atol=1e-8)


def test_backends_are_read_when_asked():
    assert "sdpa" in branch("full").backends
    assert "torch" in branch("coreset").backends
    assert {"reference", "flex"} <= set(branch("sliding_tile").backends)
    from vorta_ops import coreset

    coreset.register_backend("test_only", coreset.coreset_attention)
    try:
        assert "test_only" in branch("coreset").backends
    finally:
        coreset._BACKENDS.fns.pop("test_only")
    assert "test_only" not in branch("coreset").backends


# ---- cost ------------------------------------------------------------------------------------

def _today_sliding_share(cfg: SlidingTileConfig, grid) -> float:
    """nodes/patch.py sliding_share before the table (written out here on purpose)."""
    n = [math.ceil(g / t) for g, t in zip(grid, cfg.tile)]
    return math.prod(min(w, k) / k for w, k in zip(cfg.window, n))


@pytest.mark.parametrize("grid, cfg, want", [
    ((21, 45, 80), SlidingTileConfig((5, 9, 8), (3, 3, 3)), 3 / 5 * 3 / 5 * 3 / 10),  # Wan 720p, official tiles
    ((30, 48, 80), SlidingTileConfig((6, 8, 8), (3, 3, 3)), 3 / 5 * 3 / 6 * 3 / 10),
    ((2, 6, 4), SlidingTileConfig((1, 3, 2), (1, 1, 1)), 1 / 2 * 1 / 2 * 1 / 2),
    ((4, 4, 4), SlidingTileConfig((4, 8, 8), (3, 3, 3)), 1.0),  # fewer tiles than the window
    ((21, 45, 80), SlidingTileConfig((4, 8, 8), (5, 3, 7)), 5 / 6 * 3 / 6 * 7 / 10),  # ragged grid
])
def test_sliding_cost_is_the_visited_key_share(grid, cfg, want):
    assert branch("sliding_tile").relative_cost(cfg, grid) == pytest.approx(want)
    assert branch("sliding_tile").relative_cost(cfg, grid) == pytest.approx(_today_sliding_share(cfg, grid))


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75, 1.0])
def test_coreset_and_full_cost(keep):
    for grid in ((21, 45, 80), (2, 6, 4)):
        assert branch("coreset").relative_cost(CoresetConfig(keep_ratio=keep), grid) == pytest.approx(keep * keep)
        assert branch("full").relative_cost(None, grid) == 1.0


def test_relative_work_weights_head_calls_by_cost():
    grid = (21, 45, 80)
    cfg = RoutedConfig(sliding=SlidingTileConfig((5, 9, 8), (3, 3, 3)), coreset=CoresetConfig(keep_ratio=0.5))
    share = _today_sliding_share(cfg.sliding, grid)
    calls = {"full": 2, "coreset": 1, "sliding_tile": 1}
    want = (2 + 0.25 + share) / 4  # nodes/patch.py _relative_work before the table
    assert relative_work(calls, cfg, grid) == pytest.approx(want)
    assert relative_work({0: 2, 1: 1, 2: 1}, cfg, grid) == pytest.approx(want)  # ids work too
    by_name = {"coreset": cfg.coreset, "sliding_tile": cfg.sliding}
    assert relative_work(calls, by_name, grid) == pytest.approx(want)
    assert relative_work({"full": 5}, None, grid) == 1.0
    assert relative_work({"coreset": 3}, None, grid) == pytest.approx(CoresetConfig().keep_ratio ** 2)  # defaults
    assert relative_work({n: 0 for n in BRANCH_NAMES}, cfg, grid) == 0.0
    assert relative_work({}, cfg, grid) == 0.0
    with pytest.raises(ValueError, match="unknown branch"):
        relative_work({"dense": 1}, cfg, grid)
    with pytest.raises(TypeError, match="CoresetConfig"):
        relative_work({"coreset": 1}, {"coreset": cfg.sliding}, grid)


# ---- readers of the table --------------------------------------------------------------------

def test_router_and_files_follow_the_table(tmp_path):
    from safetensors import safe_open

    from vorta_ops.router import RouterSet, decision_shares
    from vorta_ops.router_io import load_router, save_router

    heads = 4
    r = RouterSet("generic", torch.zeros(2, N_BRANCHES * heads, 8), torch.zeros(2, N_BRANCHES * heads))
    assert r.heads == heads and r.probs(torch.zeros(8)).shape == (2, heads, N_BRANCHES)
    with pytest.raises(ValueError, match=f"{N_BRANCHES}\\*heads"):
        RouterSet("generic", torch.zeros(2, N_BRANCHES * heads + 1, 8), torch.zeros(2, N_BRANCHES * heads + 1))
    table = torch.arange(N_BRANCHES, dtype=torch.int8).repeat(2, 1)
    assert decision_shares(table) == {n: 1 / N_BRANCHES for n in BRANCH_NAMES}
    assert list(decision_shares(table)) == list(BRANCH_NAMES)
    save_router(r, tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        assert f.metadata()["branch_order"] == ",".join(BRANCH_NAMES)
    assert load_router(tmp_path / "r.safetensors").heads == heads

