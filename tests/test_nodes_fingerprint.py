"""The weights' fingerprint that keys the training-free router's on-disk measurements: stable for the
same weights and patches (across clones and processes), different for any LoRA, strength, dtype or
weight change."""
import copy

import torch

from nodes.fingerprint import model_fingerprint


class Model:
    def __init__(self, dm):
        self.diffusion_model = dm


class Patcher:
    def __init__(self, dm, patches=None):
        self.model = Model(dm)
        self.patches = patches or {}


def net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)).to(dtype)


def lora(strength, seed=1):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(16, 2, generator=g), torch.randn(2, 8, generator=g)
    return {"diffusion_model.0.weight": [(strength, ("lora", (up, down, None, None)), 1.0, None, None)]}


def test_same_weights_and_patches_give_the_same_fingerprint():
    a = model_fingerprint(Patcher(net(), lora(0.8)))
    b = model_fingerprint(Patcher(copy.deepcopy(net()), copy.deepcopy(lora(0.8))))
    assert a is not None and a == b


def test_any_change_of_weights_lora_strength_or_dtype_changes_it():
    base = model_fingerprint(Patcher(net(), lora(0.8)))
    changed = [
        Patcher(net(seed=1), lora(0.8)),  # other weights
        Patcher(net(), lora(0.7)),  # LoRA strength
        Patcher(net(), lora(0.8, seed=2)),  # another LoRA
        Patcher(net(), {}),  # no LoRA
        Patcher(net(dtype=torch.bfloat16), lora(0.8)),  # dtype
    ]
    m = net()
    with torch.no_grad():
        m[1].weight[-1, -1] += 1.0  # the last value of a tensor (sampled at fixed strides, ends included)
    changed.append(Patcher(m, lora(0.8)))
    prints = [model_fingerprint(p) for p in changed]
    assert base not in prints and len(set(prints)) == len(prints)


def test_unreadable_model_gives_none():
    assert model_fingerprint(object()) is None


def test_sample_positions_stay_inside_large_tensors():
    """A 14B model's FFN weight has 70,778,880 values: float32 cannot hold n - 1 there, and an index
    past the end is a device-side assert on a GPU (found by bench.e2e on the H200)."""
    from nodes.fingerprint import sample_index

    for n in (1, 2, 17, 2**24 + 3, 5120 * 13824, 2**31 + 5):
        idx = sample_index(n)
        assert idx.dtype == torch.long and int(idx[0]) == 0 and int(idx[-1]) == n - 1 and int(idx.max()) < n
        assert bool((idx[1:] > idx[:-1]).all()) if n > 1 else idx.tolist() == [0]


def test_a_lora_applied_in_place_does_not_change_the_fingerprint():
    """ComfyUI writes a LoRA into the weight when it loads the model and keeps it there between runs:
    the fingerprint before and after is the same (found in review: the disk cache missed)."""
    m = net()
    before = model_fingerprint(Patcher(m, lora(0.8)))
    with torch.no_grad():
        up, down = lora(0.8)["diffusion_model.0.weight"][0][1][1][:2]
        m[0].weight += 0.8 * up @ down  # what patch_model does
    assert model_fingerprint(Patcher(m, lora(0.8))) == before
    with torch.no_grad():
        m[1].bias += 1.0  # an unpatched tensor still counts
    assert model_fingerprint(Patcher(m, lora(0.8))) != before
