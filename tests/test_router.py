import torch

from vorta_ops.router import CORESET, FULL, SLIDING, RouterSet, decision_shares


def make_router(blocks=3, heads=4, embed=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RouterSet("wan", torch.randn(blocks, heads * 3, embed, generator=g), torch.randn(blocks, heads * 3, generator=g))


def test_probs_follow_the_official_formula():
    r = make_router()
    temb = torch.randn(16)
    p = r.probs(temb)
    assert p.shape == (3, 4, 3)
    for i in range(3):
        logits = torch.nn.functional.linear(torch.nn.functional.silu(temb), r.weight[i], r.bias[i])
        # row h*3+e is head h, branch e
        torch.testing.assert_close(p[i], logits.view(4, 3).softmax(-1))
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4))


def test_decide_is_argmax_and_uses_sample_zero():
    r = make_router()
    temb = torch.randn(2, 16)
    table = r.decide(temb)
    assert table.dtype == torch.int8 and table.shape == (3, 4)
    assert torch.equal(table, r.probs(temb[0]).argmax(-1).to(torch.int8))
    assert torch.equal(table, r.decide(temb[0]))


def test_biased_router_picks_the_biased_branch():
    for branch in (FULL, CORESET, SLIDING):
        b = torch.zeros(2, 5, 3)
        b[..., branch] = 50.0
        r = RouterSet("generic", torch.zeros(2, 15, 8), b.reshape(2, 15))
        assert torch.all(r.decide(torch.randn(8)) == branch)
        assert decision_shares(r.decide(torch.randn(8)))[("full", "coreset", "sliding_tile")[branch]] == 1.0


def test_wrong_embedding_size_is_explained():
    import pytest

    with pytest.raises(ValueError, match=r"embedding of size 16, got shape \(12,\)"):
        make_router().decide(torch.randn(12))
    with pytest.raises(ValueError, match=r"\[blocks, 3\*heads, embed_dim\]"):
        RouterSet("wan", torch.zeros(2, 10, 4), torch.zeros(2, 10))
