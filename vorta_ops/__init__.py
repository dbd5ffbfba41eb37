"""vorta_ops: VORTA routed sparse attention for video diffusion transformers (pure torch + triton).

Public API (everything else is internal):
    layout:        TileLayout, check_grid
    branches:      full_attention, sliding_tile_attention (+ _reference, SlidingTileConfig),
                   coreset_attention (+ coreset_reference, CoresetConfig)
    router:        RouterSet, FULL / CORESET / SLIDING, BRANCH_NAMES, decision_shares
    router files:  load_router, save_router, convert_router, RouterFileError
    dispatch:      routed_attention, RoutedConfig
    profiling:     sample_rows, profile_heads, decide_from_errors, branch_costs, HeadProfile
                   (training-free routing: measured branch errors -> a decision table)
"""
from .coreset import CoresetConfig, coreset_attention, coreset_reference
from .dispatch import RoutedConfig, routed_attention
from .full import FLASH_ATTN_AVAILABLE, full_attention
from .layout import TileLayout, check_grid
from .profiling import HeadProfile, branch_costs, decide_from_errors, profile_heads, sample_rows
from .router import BRANCH_NAMES, CORESET, FULL, SLIDING, RouterSet, decision_shares
from .router_io import RouterFileError, convert_router, load_router, save_router
from .sliding_tile import (
    ALIGNED_TILE,
    DEFAULT_WINDOW,
    HUNYUAN_TILE,
    WAN_TILE,
    SlidingTileConfig,
    sliding_tile_attention,
    sliding_tile_reference,
)

__version__ = "0.1.0"


def _register_kernels() -> None:
    """Plug the Triton kernels in as the "triton" backends where they can run (CUDA, or the
    interpreter for tests); otherwise FlexAttention / torch serve, and the log says why."""
    import logging
    import os

    import torch

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return
    try:
        from .kernels import coreset_triton, sliding_tile_triton

        sliding_tile_triton.register()
        coreset_triton.register()
    except Exception as e:  # no triton, or a triton too old for the kernels
        logging.getLogger("vorta").warning(
            "VORTA: Triton kernels unavailable (%s: %s); sliding tile uses FlexAttention and core-set the torch path. "
            "Fix: pip install -U triton", type(e).__name__, e,
        )


_register_kernels()

__all__ = [
    "TileLayout", "check_grid",
    "full_attention", "FLASH_ATTN_AVAILABLE",
    "SlidingTileConfig", "sliding_tile_attention", "sliding_tile_reference",
    "WAN_TILE", "HUNYUAN_TILE", "ALIGNED_TILE", "DEFAULT_WINDOW",
    "CoresetConfig", "coreset_attention", "coreset_reference",
    "RouterSet", "FULL", "CORESET", "SLIDING", "BRANCH_NAMES", "decision_shares",
    "load_router", "save_router", "convert_router", "RouterFileError",
    "RoutedConfig", "routed_attention",
    "sample_rows", "profile_heads", "decide_from_errors", "branch_costs", "HeadProfile",
]
