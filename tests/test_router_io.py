import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from vorta_ops.router_io import RouterFileError, convert_router, load_router, router_from_state_dict, save_router

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def official_wan(blocks=3, heads=4, embed=16, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(blocks):
        sd[f"blocks.{i}.router.linear.weight"] = torch.randn(heads * 3, embed, generator=g).to(dtype)
        sd[f"blocks.{i}.router.linear.bias"] = torch.randn(heads * 3, generator=g).to(dtype)
    return sd


def official_hunyuan(double=2, single=3, heads=2, embed=8):
    sd = {}
    for name, n in (("single_transformer_blocks", single), ("transformer_blocks", double)):
        for i in range(n):
            sd[f"{name}.{i}.router.linear.weight"] = torch.full((heads * 3, embed), float(i + (100 if "single" in name else 0)))
            sd[f"{name}.{i}.router.linear.bias"] = torch.zeros(heads * 3)
    return sd


def test_official_wan_checkpoint_loads(tmp_path):
    sd = official_wan()
    torch.save(sd, tmp_path / "router.pt")
    r = load_router(tmp_path / "router.pt")
    assert (r.family, r.blocks, r.heads, r.embed_dim) == ("wan", 3, 4, 16)
    assert r.weight.dtype == torch.bfloat16
    assert torch.equal(r.weight[2], sd["blocks.2.router.linear.weight"])
    assert r.block_names == ["blocks.0", "blocks.1", "blocks.2"]


def test_official_hunyuan_orders_dual_then_single(tmp_path):
    torch.save(official_hunyuan(), tmp_path / "router.pt")
    r = load_router(tmp_path / "router.pt")
    assert r.family == "hunyuan" and r.blocks == 5 and r.heads == 2
    assert r.block_names[:2] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert r.block_names[2:] == [f"single_transformer_blocks.{i}" for i in range(3)]
    assert float(r.weight[2, 0, 0]) == 100.0


def test_save_load_convert_round_trip(tmp_path):
    torch.save(official_wan(), tmp_path / "router.pt")
    (tmp_path / "config.json").write_text(json.dumps({"self_attention_kwargs": {"tile_size": [5, 9, 8]}}))
    r = convert_router(tmp_path / "router.pt", tmp_path / "r.safetensors", tmp_path / "config.json")
    back = load_router(tmp_path / "r.safetensors")
    assert torch.equal(back.weight, r.weight) and torch.equal(back.bias, r.bias)
    assert back.block_names == r.block_names and back.family == "wan"
    assert json.loads(back.meta["official_config"]) == {"tile_size": [5, 9, 8]}
    assert back.meta["source"] == "router.pt"
    # safetensors holding official keys loads too
    save_file(official_wan(), str(tmp_path / "official.safetensors"))
    assert torch.equal(load_router(tmp_path / "official.safetensors").weight, r.weight)


def test_convert_cli(tmp_path):
    torch.save(official_hunyuan(), tmp_path / "router.pt")
    res = subprocess.run(
        [sys.executable, "-m", "vorta_ops", "convert", str(tmp_path / "router.pt"), str(tmp_path / "o.safetensors")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "hunyuan router: 5 blocks x 2 heads, embed dim 8" in res.stdout
    res = subprocess.run([sys.executable, "-m", "vorta_ops", "inspect", str(tmp_path / "o.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "5 blocks" in res.stdout
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    res = subprocess.run([sys.executable, "-m", "vorta_ops", "inspect", str(tmp_path / "bad.pt")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "not a readable torch checkpoint" in res.stderr


def _write_pt(path, sd):
    torch.save(sd, path)
    return path


def _drop(sd, key):
    sd = dict(sd)
    del sd[key]
    return sd


BAD_STATE_DICTS = {
    "not router keys": ({"model.weight": torch.zeros(3)}, r"1 key\(s\) are not router keys \(model\.weight\)"),
    "extra key": ({**official_wan(), "blocks.0.attn.weight": torch.zeros(2)}, "are not router keys"),
    "missing bias": (_drop(official_wan(), "blocks.1.router.linear.bias"), r"'blocks\.1\.router\.linear\.bias' is missing"),
    "gap in blocks": (
        {k: v for k, v in official_wan(4).items() if not k.startswith("blocks.2.")},
        r"blocks indices \[2\] are missing",
    ),
    "rows not 3 per head": (
        {"blocks.0.router.linear.weight": torch.zeros(10, 4), "blocks.0.router.linear.bias": torch.zeros(10)},
        r"shape \(10, 4\); expected \[3\*heads, embed_dim\]",
    ),
    "heads differ between blocks": (
        {**official_wan(2), "blocks.1.router.linear.weight": torch.zeros(9, 16)},
        r"'blocks\.1\.router\.linear\.weight' has shape \(9, 16\), expected \(12, 16\)",
    ),
    "bias shape": ({**official_wan(1), "blocks.0.router.linear.bias": torch.zeros(11)}, r"bias' has shape \(11,\), expected \(12,\)"),
    "mixed families": ({**official_wan(1), **official_hunyuan(1, 0)}, "mixes Wan"),
    "empty": ({}, "expected a non-empty dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATE_DICTS))
def test_bad_state_dicts_name_the_mismatch(tmp_path, case):
    sd, msg = BAD_STATE_DICTS[case]
    with pytest.raises(RouterFileError, match=msg):
        load_router(_write_pt(tmp_path / "r.pt", sd))


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(RouterFileError, match="router file not found"):
        load_router(tmp_path / "missing.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(RouterFileError, match="is empty"):
        load_router(tmp_path / "empty.pt")
    torch.save(official_wan(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RouterFileError, match="not a readable torch checkpoint"):
        load_router(tmp_path / "trunc.pt")
    save_router(router_from_state_dict(official_wan()), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(RouterFileError, match="not a readable safetensors file"):
        load_router(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RouterFileError, match="not a readable safetensors file"):
        load_router(tmp_path / "garbage.safetensors")
    (tmp_path / "r.onnx").write_bytes(b"x")
    with pytest.raises(RouterFileError, match=r"unknown router file type '\.onnx'"):
        load_router(tmp_path / "r.onnx")
    with pytest.raises(RouterFileError, match="is a folder"):
        load_router(tmp_path)
    # a pickle with code in it is refused by weights_only loading
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RouterFileError, match="not a readable torch checkpoint"):
        load_router(tmp_path / "evil.pt")


def test_own_format_metadata_is_checked(tmp_path):
    w, b = torch.zeros(2, 6, 4), torch.zeros(2, 6)
    base = {"format": "vorta-router", "format_version": "1", "family": "wan", "blocks": "2", "heads": "2", "embed_dim": "4"}
    cases = {
        "version": ({**base, "format_version": "9"}, "format version '9' is not supported"),
        "heads": ({**base, "heads": "3"}, r"does not match its metadata \{'blocks': 2, 'heads': 3"),
        "missing": ({k: v for k, v in base.items() if k != "embed_dim"}, "metadata is incomplete"),
        "order": ({**base, "branch_order": "full,sliding_tile,coreset"}, "branch order"),
    }
    for name, (meta, msg) in cases.items():
        save_file({"weight": w, "bias": b}, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(RouterFileError, match=msg):
            load_router(tmp_path / f"{name}.safetensors")
    save_file({"weight": w, "bias": b, "x": w.clone()}, str(tmp_path / "keys.safetensors"), metadata=base)
    with pytest.raises(RouterFileError, match=r"expected tensors 'weight' and 'bias'"):
        load_router(tmp_path / "keys.safetensors")
