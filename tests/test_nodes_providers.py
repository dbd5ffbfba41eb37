"""Router providers: the file router (with the official tau_sparse rule) and the interface any
other router kind implements."""
import pytest
import torch

from nodes import patch as P
from nodes.models import inspect_model, router_embedding
from nodes.providers import FileRouterProvider, RouterProvider, StepContext, as_provider, decide
from vorta_ops.router import CORESET, FULL, SLIDING, RouterSet
from test_nodes_patch import FakePatcher, WanModel, router_for


def test_tau_sparse_sends_unsure_heads_to_full():
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]]])
    assert decide(probs, 0.3).tolist() == [[CORESET, FULL, SLIDING]]  # official default: argmax
    assert decide(probs, 0.6).tolist() == [[FULL, FULL, SLIDING]]
    assert decide(probs, 0.0).tolist() == [[CORESET, FULL, SLIDING]]


def test_file_provider_equals_the_router_at_the_official_tau_and_differs_when_raised():
    g = torch.Generator().manual_seed(0)
    # biases spread the branch probabilities (top-1 between 1/3 and ~0.7), weights add a little timestep dependence
    router = RouterSet("wan", torch.randn(2, 6, 256, generator=g) * 1e-3, torch.randn(2, 6, generator=g) * 0.5)
    dm = WanModel()
    ctx = StepContext(dm, inspect_model(dm), 500.0)
    official = FileRouterProvider(router)
    temb = router_embedding(dm, ctx.spec, 500.0, torch.float32, "cpu")
    assert torch.equal(official.table(ctx), router.decide(temb))  # 3 branches: top-1 >= 1/3 > 0.3
    probs = official.probabilities(ctx)
    assert float(probs.max(-1).values.max()) < 0.99 and float(probs.max(-1).values.min()) < 0.5
    strict = FileRouterProvider(router, tau_sparse=0.99)
    assert bool((strict.table(ctx) == FULL).all())
    middle = FileRouterProvider(router, tau_sparse=0.5)  # exactly the heads less sure than 0.5 go full
    assert torch.equal(middle.table(ctx) == FULL, (probs.max(-1).values < 0.5) | (router.decide(temb) == FULL))
    with pytest.raises(ValueError, match="tau_sparse must be a probability"):
        FileRouterProvider(router, tau_sparse=1.5)


def test_fit_check_and_type_errors():
    with pytest.raises(ValueError, match="blocks: router 3, model 2"):
        as_provider(router_for([[0, 0]] * 3)).check_fits(inspect_model(WanModel()))
    with pytest.raises(TypeError, match="expected a VORTA router"):
        as_provider("router.pt")


class FixedProvider:
    """Another kind of router: a fixed table whatever the step (e.g. a measured one)."""

    kind = "fixed"
    blocks, heads = 2, 2

    def __init__(self):
        self.asked = []

    def describe(self):
        return "fixed"

    def check_fits(self, spec):
        if (spec.blocks, spec.heads) != (2, 2):
            raise ValueError("does not fit")

    def table(self, ctx):
        self.asked.append((ctx.timestep, ctx.percent))
        return torch.tensor([[SLIDING, CORESET], [FULL, SLIDING]], dtype=torch.int8)

    def probabilities(self, ctx):
        return None


def test_any_provider_plugs_into_apply_without_touching_the_patch():
    prov = FixedProvider()
    assert isinstance(prov, RouterProvider) and as_provider(prov) is prov
    patched, state = P.apply_vorta(FakePatcher(WanModel()), prov, P.VortaOptions(dense_blocks=frozenset({1})))
    table = state.table_for(WanModel(), 250.0, torch.float32, "cpu", sigma=0.25, percent=0.75)
    assert table.tolist() == [[SLIDING, CORESET], [FULL, SLIDING]] and prov.asked == [(250.0, 0.75)]
    assert state.apply_overrides(table, 0.75).tolist() == [[SLIDING, CORESET], [FULL, FULL]]
