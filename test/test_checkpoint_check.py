"""Checkpoints checked before use (issue 12): what a file is, whose it is, whether it is complete, and the
trust rule for files that need more than torch.load(weights_only=True). Small synthetic checkpoints in the
formats mmcv (FB-OCC) and Lightning (BEVDepth) write; no upstream needed."""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bevkit import checkpoint_check as cc  # noqa: E402
from bevkit import torch_load  # noqa: E402
from bevkit.errors import CheckpointError  # noqa: E402
from bevkit.models import get_spec  # noqa: E402

FBOCC, BEVDEPTH = get_spec("fbocc"), get_spec("bevdepth")


def _tensor(*shape):
    return torch.zeros(*shape)


def fbocc_state(skip=()):
    return {f"{m}.weight": _tensor(2, 2) for m in FBOCC.checkpoint_format.modules if m not in skip}


def write_fbocc(path: Path, skip=(), **extra) -> Path:
    """The layout mmcv's save_checkpoint writes for FB-OCC (meta iter is 0-based, like mmcv's)."""
    ckpt = {"meta": {"iter": 11, "epoch": 1, "config": "...", "CLASSES": ["free"]},
            "state_dict": collections.OrderedDict(fbocc_state(skip)),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def run_folder(path: Path) -> Path:
    """A folder the launcher would have made (its launch.json names it): a trusted place."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "launch.json").write_text(json.dumps({"request": {"run_dir": str(path)}}))
    return path


def write_bevdepth(path: Path, hparams=None) -> Path:
    """The layout Lightning 1.9 writes for BEVDepth (MultiStepLR's milestones are a Counter: torch 2.1's
    weights_only refuses it, so on torch 2.1 these files load only from trusted places, e.g. a run folder)."""
    torch.save({"epoch": 6, "global_step": 7, "pytorch-lightning_version": "1.9.5",
                "state_dict": {"model.backbone.w": _tensor(3), "model.head.w": _tensor(3)},
                "loops": {"fit_loop": {}}, "callbacks": {}, "optimizer_states": [{"state": {}, "param_groups": []}],
                "lr_schedulers": [{"milestones": collections.Counter({19: 1, 23: 1})}],
                "hyper_parameters": hparams or {"batch_size_per_device": 2}}, path)
    return path


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch):
    for name in ("BEVKIT_TRUST_CHECKPOINT", "BEVKIT_CKPT_DIR", "BEVKIT_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)


def test_own_checkpoints_pass_and_say_what_they_hold(tmp_path):
    found = cc.check(FBOCC, write_fbocc(tmp_path / "iter_12.pth"), "resume")
    assert (found.framework, found.step, found.resumable) == ("mmcv", 12, True)  # completed iterations
    found = cc.check(BEVDEPTH, write_bevdepth(run_folder(tmp_path / "run") / "epoch=6-step=7.ckpt"), "eval")
    assert (found.framework, found.step, found.epoch) == ("lightning", 7, 6)


def test_another_models_checkpoint_is_named_for_what_it_is(tmp_path):
    bevdepth = write_bevdepth(run_folder(tmp_path / "run") / "epoch=6-step=7.ckpt")
    with pytest.raises(CheckpointError) as e:
        cc.check(FBOCC, bevdepth, "eval")
    assert str(e.value) == (f"fbocc eval: {bevdepth} is a BEVDepth Lightning checkpoint (epoch 6, step 7), "
                            "not an FB-OCC one (it belongs to --model bevdepth; pass an iter_N.pth (or latest.pth) "
                            "of an FB-OCC run folder)")
    fbocc = write_fbocc(tmp_path / "iter_12.pth")
    with pytest.raises(CheckpointError, match=r"is an FB-OCC mmcv checkpoint \(epoch 1, step 12\), not a BEVDepth"):
        cc.check(BEVDEPTH, fbocc, "init")
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": _tensor(1), "layer1.0.weight": _tensor(1)}, resnet)
    with pytest.raises(CheckpointError, match=r"a state dict of 2 tensors \(conv1, layer1\) of no model the kit"):
        cc.check(FBOCC, resnet, "eval")


def test_kit_metadata_decides_when_present(tmp_path):
    path = write_fbocc(tmp_path / "iter_12.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["bevkit"] = {"model": "bevdepth", "completed_iters": 12}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="not an FB-OCC one"):
        cc.check(FBOCC, path, "eval")


def test_truncated_and_foreign_files_get_one_line(tmp_path):
    good = write_fbocc(tmp_path / "iter_12.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        cc.check(FBOCC, cut, "eval")
    message = str(e.value)
    assert "\n" not in message and str(cut) in message and "not a readable checkpoint" in message
    assert "truncated" in message and "copy it again" in message
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        cc.check(FBOCC, text, "eval")
    with pytest.raises(CheckpointError, match="does not exist"):
        cc.check(FBOCC, tmp_path / "missing.pth", "eval")


def test_incomplete_and_non_resumable_files(tmp_path):
    partial = write_fbocc(tmp_path / "partial.pth", skip=("occupancy_head", "depth_net"))
    with pytest.raises(CheckpointError, match="is an incomplete FB-OCC mmcv checkpoint: it has no depth_net, "
                                              "occupancy_head weights"):
        cc.check(FBOCC, partial, "eval")
    ema = tmp_path / "iter_12_ema.pth"
    torch.save({"iter": 12, "state_dict": fbocc_state(), "updates": 12}, ema)
    assert cc.check(FBOCC, ema, "eval").framework == "ema"  # weights: fine to evaluate
    with pytest.raises(CheckpointError, match="without the training state .* --checkpoint FILE to start"):
        cc.check(FBOCC, ema, "resume")


def test_compare_allows_only_the_documented_differences():
    fmt = FBOCC.checkpoint_format
    model = {"a.weight": (2, 2), "a.bn.num_batches_tracked": ()}
    cc.compare(model, {"a.weight": (2, 2)}, fmt, "x.pth")  # num_batches_tracked: allow-listed
    cc.compare(model, {"module.a.weight": (2, 2), "occupancy_head.focal_loss.c": (200, 200)}, fmt, "x.pth")
    with pytest.raises(CheckpointError) as e:
        cc.compare(model, {"a.weight": (3, 2), "b.weight": (1,)}, fmt, "x.pth")
    assert "1 unexpected (e.g. b.weight)" in str(e.value) and "a.weight: [3, 2] in the file, [2, 2] in the model" \
        in str(e.value) and "--config" in str(e.value)
    with pytest.raises(CheckpointError, match="1 missing"):
        cc.compare({"a.weight": (2, 2), "c.weight": (1,)}, {"a.weight": (2, 2)}, fmt, "x.pth")


def test_weights_only_first_and_full_unpickling_only_in_trusted_places(tmp_path, monkeypatch):
    """A file that needs more than weights_only (here an argparse.Namespace, refused by every torch) loads
    only from a run folder, the checkpoint folder, or with --trust-checkpoint."""
    (tmp_path / "downloads").mkdir()
    odd = write_bevdepth(tmp_path / "downloads" / "x.ckpt", hparams={"args": argparse.Namespace(lr=1)})
    with pytest.raises(CheckpointError) as e:
        torch_load.load(odd)
    # the first global torch refuses: the Counter on torch 2.1, the Namespace on torch 2.13
    assert str(odd) in str(e.value) and "--trust-checkpoint" in str(e.value)
    assert "argparse.Namespace" in str(e.value) or "collections.Counter" in str(e.value)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        cc.check(BEVDEPTH, odd, "eval")
    monkeypatch.setenv("BEVKIT_TRUST_CHECKPOINT", "1")
    assert torch_load.load(odd)["global_step"] == 7
    monkeypatch.delenv("BEVKIT_TRUST_CHECKPOINT")

    run = tmp_path / "runs" / "20260101T000000Z"
    (run / "ckpts").mkdir(parents=True)
    moved = run / "ckpts" / "x.ckpt"
    moved.write_bytes(odd.read_bytes())
    (run / "launch.json").write_text(json.dumps({"request": {"run_dir": str(tmp_path / "elsewhere")}}))
    with pytest.raises(CheckpointError):  # a launch.json that names another folder makes no run folder
        torch_load.load(moved)
    run_folder(run)
    assert torch_load.load(moved)["global_step"] == 7

    data = tmp_path / "data"
    (data / "ckpts").mkdir(parents=True)
    in_ckpts = data / "ckpts" / "x.ckpt"
    in_ckpts.write_bytes(odd.read_bytes())
    with pytest.raises(CheckpointError):
        torch_load.load(in_ckpts)
    assert torch_load.load(in_ckpts, data_root=str(data))["global_step"] == 7


def test_plain_checkpoints_never_need_trust(tmp_path):
    """mmcv checkpoints (FB-OCC) hold tensors, strings, numbers, lists and dicts: weights_only on both torch
    versions, from anywhere; the kit's resume state (RNG, EMA) keeps to the same types."""
    from bevkit import training_state

    path = write_fbocc(tmp_path / "iter_12.pth", ema={"state_dict": fbocc_state(), "updates": 3})
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["bevkit"] = {"model": "fbocc", "completed_iters": 12, "rng": training_state.rng_state()}
    torch.save(ckpt, path)
    assert torch_load.load(path)["meta"]["bevkit"]["completed_iters"] == 12


def test_the_cli_prints_one_line_and_exit_3(tmp_path, capsys):
    path = write_bevdepth(run_folder(tmp_path / "run") / "epoch=6-step=7.ckpt")
    assert cc.main(["--model", "fbocc", "--purpose", "eval", str(path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: fbocc eval: ")
    assert cc.main(["--model", "bevdepth", "--purpose", "resume", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 7
