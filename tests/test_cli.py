"""python -m vorta_ops: every refused argument gives one "error: ..." line on stderr, exit code 2,
no traceback, and leaves every file as it was (nothing written, overwritten or lost)."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_router_io import official_hunyuan, official_wan
from vorta_ops.__main__ import main
from vorta_ops.router_io import load_router

ROOT = Path(__file__).resolve().parents[1]

HUNYUAN_CONFIG = {  # as the official HunyuanVideo train script writes it
    "name": "HunyuanVideoTransformer3DModel",
    "pretrained_model_path": "/raid/data/models/HunyuanVideo",
    "revision": None,
    "train_video_size": [117, 720, 1280],
    "self_attention_kwargs": {"lowres_window_size": [2, 2, 2], "tile_size": [6, 9, 8], "window_size": [3, 3, 3]},
}
WAN_CONFIG = {**HUNYUAN_CONFIG, "name": "WanTransformer3DModel", "pretrained_model_path": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}


def snapshot(root: Path) -> dict:
    """Every path under root -> its bytes (None for folders, the target for symlinks)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            snap[rel] = None
        else:
            snap[rel] = p.read_bytes()
    return snap


# ---- the refused cases: setup(tmp) -> argv; the stderr line must contain every `needs` part ----


def _wan_pt(tmp):
    torch.save(official_wan(), tmp / "router.pt")
    return str(tmp / "router.pt")


def _hunyuan_pt(tmp):
    torch.save(official_hunyuan(), tmp / "router.pt")
    return str(tmp / "router.pt")


def _config(tmp, cfg):
    (tmp / "config.json").write_text(json.dumps(cfg))
    return str(tmp / "config.json")


def _raw(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _existing_dst(tmp):
    (tmp / "old.safetensors").write_bytes(b"an older conversion the user keeps")
    return ["convert", _wan_pt(tmp), str(tmp / "old.safetensors")]


def _same_via_symlink(tmp):
    save_file(official_wan(), str(tmp / "src.safetensors"))
    (tmp / "link.safetensors").symlink_to(tmp / "src.safetensors")
    return ["convert", str(tmp / "src.safetensors"), str(tmp / "link.safetensors"), "--force"]


def _random_pt(tmp):
    (tmp / "random.pt").write_bytes(bytes(range(256)) * 3 + os.urandom(200))
    return str(tmp / "random.pt")


def _demo(tmp, *extra):
    return ["demo", "--out", str(tmp / "demo_out"), "--grid", "2,4,4", "--tile", "1,2,2", "--steps", "1", *extra]


def _out_is_file(tmp):
    (tmp / "results").write_bytes(b"precious results, not a folder")
    return ["demo", "--out", str(tmp / "results"), "--grid", "2,4,4", "--tile", "1,2,2"]


def _out_under_file(tmp):
    (tmp / "results").write_bytes(b"precious results, not a folder")
    return ["demo", "--out", str(tmp / "results" / "sub")]


CASES = {
    # convert: destinations
    "convert into a missing folder": (
        lambda t: ["convert", _wan_pt(t), str(t / "missing" / "r.safetensors")], ["does not exist", "create it"]),
    "convert onto a folder": (
        lambda t: (t / "out.safetensors").mkdir() or ["convert", _wan_pt(t), str(t / "out.safetensors")],
        ["is a folder", "file name"]),
    "convert onto a folder without suffix": (
        lambda t: (t / "outdir").mkdir() or ["convert", _wan_pt(t), str(t / "outdir")], ["is a folder", "router.safetensors"]),
    "convert to a .pt name": (lambda t: ["convert", _wan_pt(t), str(t / "out.pt")], ["safetensors", ".safetensors name", "out.safetensors"]),
    "convert a.pt a.pt": (lambda t: ["convert", _wan_pt(t), str(t / "router.pt")], ["is the source file", ".safetensors"]),
    "convert onto its source": (
        lambda t: save_file(official_wan(), str(t / "r.safetensors")) or ["convert", str(t / "r.safetensors"), str(t / "r.safetensors")],
        ["is the source file"]),
    "convert onto its source with --force": (
        lambda t: save_file(official_wan(), str(t / "r.safetensors")) or (t / "sub").mkdir()
        or ["convert", str(t / "r.safetensors"), str(t / "sub" / ".." / "r.safetensors"), "--force"],
        ["is the source file"]),
    "convert onto a symlink to its source": (_same_via_symlink, ["is the source file"]),
    "convert onto an existing file": (_existing_dst, ["already exists", "--force"]),
    # convert: sources and configs
    "convert a missing source": (lambda t: ["convert", str(t / "nope.pt"), str(t / "o.safetensors")], ["not found"]),
    "convert random bytes": (lambda t: ["convert", _random_pt(t), str(t / "o.safetensors")], ["not a router checkpoint", "corrupt", "another kind of file", "Re-download"]),
    "inspect random bytes": (lambda t: ["inspect", _random_pt(t)], ["not a router checkpoint", "Re-download"]),
    "convert Wan router with a HunyuanVideo config": (
        lambda t: ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config", _config(t, HUNYUAN_CONFIG)],
        ["HunyuanVideo config", "HunyuanVideoTransformer3DModel", "Wan router", "blocks.0.router.linear", "config.json saved with this router"]),
    "convert HunyuanVideo router with a Wan config": (
        lambda t: ["convert", _hunyuan_pt(t), str(t / "o.safetensors"), "--config", _config(t, WAN_CONFIG)],
        ["Wan config", "HunyuanVideo router"]),
    "convert with a Hunyuan config naming the family by its model path only": (
        lambda t: ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config",
                   _config(t, {"pretrained_model_path": "hunyuanvideo-community/HunyuanVideo", "self_attention_kwargs": {}})],
        ["HunyuanVideo config", "pretrained_model_path", "Wan router"]),
    "convert with a diffusers config of other heads": (
        lambda t: ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config",
                   _config(t, {"_class_name": "WanTransformer3DModel", "num_attention_heads": 40, "num_layers": 3})],
        ["40 attention heads", "4 heads"]),
    "convert with a diffusers config of other blocks": (
        lambda t: ["convert", _hunyuan_pt(t), str(t / "o.safetensors"), "--config",
                   _config(t, {"_class_name": "HunyuanVideoTransformer3DModel", "num_attention_heads": 2,
                               "num_layers": 20, "num_single_layers": 40})],
        ["60 transformer blocks", "5 blocks"]),
    "convert with a config that is not JSON": (
        lambda t: ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config", _raw(t / "config.json", b"\x80\x81 not json")],
        ["not a readable JSON config"]),
    "convert with a config that is a folder": (
        lambda t: (t / "cfg").mkdir() or ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config", str(t / "cfg")],
        ["is a folder", "config.json"]),
    "convert with a config that is a list": (
        lambda t: ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config", _config(t, [1, 2])], ["expected a JSON object"]),
    "convert with a missing config": (
        lambda t: ["convert", _wan_pt(t), str(t / "o.safetensors"), "--config", str(t / "nope.json")], ["not a readable JSON config"]),
    "convert with no dst": (lambda t: ["convert", _wan_pt(t)], ["dst", "--help"]),
    # demo
    "demo --grid 0,4,4": (lambda t: _demo(t, "--grid", "0,4,4"), ["--grid", "positive", "8,16,24"]),
    "demo --grid a,b,c": (lambda t: _demo(t, "--grid", "a,b,c"), ["--grid", "three integers", "'a,b,c'"]),
    "demo --grid 1,2": (lambda t: _demo(t, "--grid", "1,2"), ["--grid", "three integers"]),
    "demo --grid -1,4,4": (lambda t: _demo(t, "--grid=-1,4,4"), ["--grid", "positive"]),
    "demo --heads 0": (lambda t: _demo(t, "--heads", "0"), ["--heads", "at least 1", "got 0"]),
    "demo --heads -3": (lambda t: _demo(t, "--heads=-3"), ["--heads", "at least 1"]),
    "demo --heads 1.5": (lambda t: _demo(t, "--heads", "1.5"), ["--heads", "whole number", "1.5"]),
    "demo --steps 0": (lambda t: _demo(t, "--steps", "0"), ["--steps", "at least 1"]),
    "demo --blocks 0": (lambda t: _demo(t, "--blocks", "0"), ["--blocks", "at least 1"]),
    "demo --head-dim 0": (lambda t: _demo(t, "--head-dim", "0"), ["--head-dim", "at least 1"]),
    "demo --head-dim 33": (lambda t: _demo(t, "--head-dim", "33"), ["--head-dim", "even"]),
    "demo --tile 0,2,2": (lambda t: _demo(t, "--tile", "0,2,2"), ["--tile", "positive"]),
    "demo --tile x": (lambda t: _demo(t, "--tile", "x"), ["--tile", "three integers"]),
    "demo --window 2,3,3": (lambda t: _demo(t, "--window", "2,3,3"), ["--window", "odd", "3,3,3"]),
    "demo --window 0,3,3": (lambda t: _demo(t, "--window", "0,3,3"), ["--window", "positive"]),
    "demo --device cuda:99": (lambda t: _demo(t, "--device", "cuda:99"), ["cuda:99", "--device"]),
    "demo --device foo": (lambda t: _demo(t, "--device", "foo"), ["unknown device 'foo'", "cpu or cuda"]),
    "demo --device meta": (lambda t: _demo(t, "--device", "meta"), ["cpu or cuda"]),
    "demo --out <a file>": (_out_is_file, ["is a file, not a folder", "--out"]),
    "demo --out <a path under a file>": (_out_under_file, ["cannot create the output folder", "--out"]),
    "demo --bogus": (lambda t: _demo(t, "--bogus"), ["unrecognized arguments: --bogus"]),
    "no command": (lambda t: [], ["required", "{demo,convert,inspect}", "--help"]),
}
if not torch.cuda.is_available():
    CASES["demo --device cuda on a CPU-only torch"] = (
        lambda t: _demo(t, "--device", "cuda"), ["'cuda' is not available", "--device cpu"])

NEVER = ("Traceback", "weights_only", "weights-only")


def _check_refusal(rc, out, err, needs, before, tmp):
    assert rc == 2, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in needs:
        assert part in lines[0], (part, lines[0])
    for word in NEVER:
        assert word not in err, err
    assert snapshot(tmp) == before  # nothing written, overwritten, lost, or left behind (no temp files)
    assert not (tmp / "demo_out").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_process(tmp_path, capsys, case):
    setup, needs = CASES[case]
    argv = setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    _check_refusal(rc, out, err, needs, before, tmp_path)


def test_refused_through_python_m(tmp_path):
    """Each case once more as a real `python -m vorta_ops` process: no traceback reaches stderr."""
    runs = []
    for n, (case, (setup, needs)) in enumerate(CASES.items()):
        tmp = tmp_path / f"case{n}"
        tmp.mkdir()
        argv = setup(tmp)
        runs.append((case, tmp, argv, needs, snapshot(tmp)))

    def run(item):
        case, tmp, argv, needs, before = item
        return subprocess.run([sys.executable, "-m", "vorta_ops", *argv], cwd=ROOT, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, runs))
    for (case, tmp, argv, needs, before), res in zip(runs, results):
        try:
            _check_refusal(res.returncode, res.stdout, res.stderr, needs, before, tmp)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None


# ---- what works, and the --force / temp-file behaviour ----


def test_convert_writes_a_loadable_router_and_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = _wan_pt(tmp_path)
    dst = tmp_path / "r.safetensors"
    assert main(["convert", src, str(dst), "--config", _config(tmp_path, WAN_CONFIG)]) == 0
    first = dst.read_bytes()
    r = load_router(dst)
    assert (r.family, r.blocks, r.heads) == ("wan", 3, 4)
    assert json.loads(r.meta["official_config"]) == WAN_CONFIG["self_attention_kwargs"]
    capsys.readouterr()
    assert main(["convert", src, str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert dst.read_bytes() == first
    torch.save(official_wan(blocks=5), src)
    assert main(["convert", src, str(dst), "--force"]) == 0
    assert load_router(dst).blocks == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "r.safetensors", "router.pt"]  # no temp files


def test_convert_accepts_a_matching_hunyuan_config_and_one_that_names_no_family(tmp_path):
    src = _hunyuan_pt(tmp_path)
    assert main(["convert", src, str(tmp_path / "a.safetensors"), "--config", _config(tmp_path, HUNYUAN_CONFIG)]) == 0
    assert load_router(tmp_path / "a.safetensors").family == "hunyuan"
    # a user folder called "wang" is not Wan
    cfg = {"pretrained_model_path": "/home/wang/models/mymodel", "self_attention_kwargs": {"tile_size": [6, 9, 8]}}
    assert main(["convert", src, str(tmp_path / "b.safetensors"), "--config", _config(tmp_path, cfg)]) == 0


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")  # the disk fills up half-way
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    src = _wan_pt(tmp_path)
    before = snapshot(tmp_path)
    assert main(["convert", src, str(tmp_path / "new.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "No space left on device" in err and len(err.splitlines()) == 1
    assert snapshot(tmp_path) == before  # no new.safetensors, no temp file
    (tmp_path / "old.safetensors").write_bytes(b"old")
    before = snapshot(tmp_path)
    assert main(["convert", src, str(tmp_path / "old.safetensors"), "--force"]) == 2
    assert snapshot(tmp_path) == before  # the old file is intact


def test_help_and_usage_exit_codes(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["convert", "--help"]) == 0
    assert "--force" in capsys.readouterr().out
