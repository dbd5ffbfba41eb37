"""VORTA's attention override as torch.compile sees it: one opaque custom op per attention call.

Under ComfyUI's TorchCompileModel the whole diffusion model is traced, our DIFFUSION_MODEL
wrapper and block patches included. The eager override (patch.vorta_attention_override) decides per
call, from per-step Python state (the run, the step's routing plan, the profiler), what to do; traced
by dynamo, each of those reads would become a guard, and a routing table that changes with the step
would recompile the model every step. So while compiling, the override only packs the call into
``vorta::comfy_attention``: q, k, v, the mask, the head count, which VORTA block (if any) the call is
the first attention call of, and an integer naming the (patch state, attention function) pair.
Everything else happens in the op's body at run time, eagerly: the same override, with the same
counting, delegation and fallbacks. The compiled graph is one graph per model call (the wrapper's
set-up, which reads the step, is the one break), the op stays one node per attention call, and a
new step's routing is data, not code: no recompiles.

The op always returns [B, Lq, heads * Dv] (contiguous); the traced side reshapes for
``skip_output_reshape``. A call with keyword arguments the op cannot carry goes the eager way (a
graph break, still correct).
"""
from __future__ import annotations

import itertools
import weakref

import torch

__all__ = ["traced_attention", "register_state", "COMFY_ATTENTION_OP", "STASH_ATTR"]

BLOCK_KEY = "vorta_block"  # = patch.BLOCK_KEY (patch imports this module)
STASH_ATTR = "call_options"  # VortaState attribute: the transformer_options of the model call in progress
_CARRIED = frozenset({"transformer_options", "_inside_attn_wrapper", "mask", "attn_precision", "skip_reshape",
                      "skip_output_reshape", "heads"})

_states: dict[int, weakref.ref] = {}  # state handle -> the VortaState
_pairs: dict[int, tuple[int, object]] = {}  # call handle -> (state handle, attention function)
_ids = itertools.count(1)


def register_state(state) -> int:
    """A handle for a patch state (VortaState keeps it as ``compile_handle``): what a traced graph
    names the state by (older torch treats only plain values as trace-time constants)."""
    for key, ref in list(_states.items()):
        if ref() is None:
            del _states[key]
            for call in [c for c, (s, _) in _pairs.items() if s == key]:
                del _pairs[call]
    key = next(_ids)
    _states[key] = weakref.ref(state)
    return key


@torch._dynamo.assume_constant_result
def _handle(state_handle: int, func) -> int:
    """An integer for (state, func), made at trace time and baked into the graph as a constant."""
    for key, pair in _pairs.items():
        if pair[0] == state_handle and pair[1] is func:
            return key
    key = next(_ids)
    _pairs[key] = (state_handle, func)
    return key


def _lookup(call: int):
    state_handle, func = _pairs.get(call, (None, None))
    ref = _states.get(state_handle)
    state = ref() if ref is not None else None
    if state is None:
        raise RuntimeError("VORTA: a compiled graph outlived the VORTA patch it was traced for; run the workflow again")
    return state, func


def _dims(q, v, heads: int, skip_reshape: bool):
    if skip_reshape:  # [B, H, L, D]
        return q.shape[0], q.shape[2], v.shape[3]
    return q.shape[0], q.shape[1], v.shape[2] // heads


def _op_body(q, k, v, mask, call, heads, block, skip_reshape, attn_precision, inside_wrapper):
    from .patch import vorta_attention_override

    state, func = _lookup(call)
    to = getattr(state, STASH_ATTR, None)
    to = to if isinstance(to, dict) else {}
    kwargs = dict(transformer_options=to, skip_reshape=skip_reshape, skip_output_reshape=False)
    if mask is not None:
        kwargs["mask"] = mask
    if attn_precision is not None:
        kwargs["attn_precision"] = attn_precision
    if inside_wrapper:
        kwargs["_inside_attn_wrapper"] = True
    if block >= 0:
        to[BLOCK_KEY] = block  # the traced block patch set it in the graph's copy of the options
    try:
        out = vorta_attention_override(state, func, q, k, v, heads, **kwargs)
    finally:
        to.pop(BLOCK_KEY, None)
    B, L, Dv = _dims(q, v, heads, skip_reshape)
    out = out.reshape(B, L, heads * Dv)
    # an op's output may not alias its inputs (an override that hands back its input would)
    if not out.is_contiguous() or any(out.data_ptr() == t.data_ptr() for t in (q, k, v)):
        out = out.clone(memory_format=torch.contiguous_format)
    return out


COMFY_ATTENTION_OP = torch.library.custom_op(
    "vorta::comfy_attention",
    _op_body,
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, int call, int heads, int block, bool skip_reshape, "
           "ScalarType? attn_precision, bool inside_wrapper) -> Tensor",
)


@COMFY_ATTENTION_OP.register_fake
def _op_fake(q, k, v, mask, call, heads, block, skip_reshape, attn_precision, inside_wrapper):
    B, L, Dv = _dims(q, v, heads, skip_reshape)
    return q.new_empty((B, L, heads * Dv), dtype=q.dtype)


def traced_attention(state, func, args, kwargs):
    """The override's traced form: the call as one ``vorta::comfy_attention`` node, or None when the
    call has arguments the op cannot carry (the caller then runs the eager override)."""
    if len(args) < 3 or len(args) > 4 or not _CARRIED.issuperset(kwargs):
        return None
    q, k, v = args[:3]
    heads = kwargs["heads"] if "heads" in kwargs else (args[3] if len(args) > 3 else None)
    mask = kwargs.get("mask")
    precision = kwargs.get("attn_precision")
    if not isinstance(heads, int) or not (mask is None or isinstance(mask, torch.Tensor)):
        return None
    if not (precision is None or isinstance(precision, torch.dtype)):
        return None
    skip_reshape = bool(kwargs.get("skip_reshape", False))
    to = kwargs.get("transformer_options")
    block = to.pop(BLOCK_KEY, None) if isinstance(to, dict) else None
    out = COMFY_ATTENTION_OP(q, k, v, mask, _handle(state.compile_handle, func), heads, -1 if block is None else int(block),
                             skip_reshape, precision, bool(kwargs.get("_inside_attn_wrapper", False)))
    if kwargs.get("skip_output_reshape", False):
        B, L, Dv = _dims(q, v, heads, skip_reshape)
        return out.view(B, L, heads, Dv).transpose(1, 2)
    return out
