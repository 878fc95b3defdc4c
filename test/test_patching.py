"""The runtime-patch registry: targets resolved before anything changes, loud failures, undo."""
import sys
import types

import pytest

from bevkit.patching import PATCH_SETS, PatchCheckFailed, PatchSet, PatchTargetMissing, RuntimePatch


@pytest.fixture
def fake_upstream(monkeypatch):
    mod = types.ModuleType("fake_upstream_mod")

    class Head:
        def loss(self, x):
            return x + 1

    mod.Head = Head
    mod.helper = lambda: "original"
    monkeypatch.setitem(sys.modules, "fake_upstream_mod", mod)
    return mod


def test_apply_wraps_original_and_undo_restores(fake_upstream):
    patches = PatchSet("t", [
        RuntimePatch("head.loss.double", "fake_upstream_mod:Head.loss",
                     lambda orig: (lambda self, x: 2 * orig(self, x)), why="test"),
        RuntimePatch("helper.npu", "fake_upstream_mod:helper", lambda orig: (lambda: "npu"),
                     why="test", devices=("npu",)),
    ])
    assert patches.apply("cpu") == ["head.loss.double"]
    assert fake_upstream.Head().loss(1) == 4
    assert fake_upstream.helper() == "original"  # npu-only patch skipped on cpu
    patches.undo()
    assert fake_upstream.Head().loss(1) == 2
    assert patches.apply("npu") == ["head.loss.double", "helper.npu"]
    assert fake_upstream.helper() == "npu"
    patches.undo()


def test_opt_in_patches_apply_only_when_enabled(fake_upstream):
    switch = [False]
    patches = PatchSet("t", [RuntimePatch("helper.opt-in", "fake_upstream_mod:helper", lambda orig: (lambda: "on"),
                                          why="test", enabled=lambda: switch[0])])
    assert patches.apply("cpu") == [] and fake_upstream.helper() == "original"
    assert "(opt-in)" in patches.describe()[0]["devices"]
    switch[0] = True
    patches.undo()
    assert patches.apply("cpu") == ["helper.opt-in"] and fake_upstream.helper() == "on"
    patches.undo()


def test_missing_target_fails_loudly_and_changes_nothing(fake_upstream):
    original = fake_upstream.Head.loss
    patches = PatchSet("t", [
        RuntimePatch("ok", "fake_upstream_mod:Head.loss", lambda o: None, why="test"),
        RuntimePatch("gone", "fake_upstream_mod:Head.vanished", lambda o: None, why="test"),
    ])
    with pytest.raises(PatchTargetMissing, match=r"'gone'.*Head\.vanished.*bevkit.upstream status"):
        patches.apply("cpu")
    assert fake_upstream.Head.loss is original
    assert patches.applied == []


def test_missing_module_names_the_module():
    patches = PatchSet("t", [RuntimePatch("p", "no_such_module_xyz:f", lambda o: o, why="test")])
    with pytest.raises(PatchTargetMissing, match="no_such_module_xyz"):
        patches.apply("cpu")


def test_check_guards_against_other_upstream_code(fake_upstream):
    patches = PatchSet("t", [RuntimePatch("p", "fake_upstream_mod:helper", lambda o: o, why="test",
                                          check=lambda orig: orig() == "something else")])
    with pytest.raises(PatchCheckFailed, match="'p'"):
        patches.apply("cpu")


def test_duplicate_names_and_bad_targets_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        PatchSet("t", [RuntimePatch("a", "m:f", lambda o: o, why=""), RuntimePatch("a", "m:g", lambda o: o, why="")])
    with pytest.raises(ValueError, match="must look like"):
        RuntimePatch("a", "no_colon", lambda o: o, why="")
    with pytest.raises(ValueError, match="unknown devices"):
        RuntimePatch("a", "m:f", lambda o: o, why="", devices=("tpu",))


def test_double_apply_refused(fake_upstream):
    patches = PatchSet("t", [RuntimePatch("p", "fake_upstream_mod:helper", lambda o: o, why="")])
    with patches:
        patches.apply("cpu")
        with pytest.raises(RuntimeError, match="already applied"):
            patches.apply("cpu")
    assert patches.applied == []


def test_every_patch_set_is_registered_by_import_path():
    assert set(PATCH_SETS) >= {"common", "fbocc", "bevdepth"}
    assert all(":" in path for path in PATCH_SETS.values())
