"""bevkit.upstream against small git repositories made here: sources, verification, patches, status."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from bevkit import upstream
from bevkit.upstream import PatchDoesNotApply, UpstreamError

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
ORIGINAL = "line 1\nline 2\nline 3\nline 4\nline 5\n"


def git(cwd, *args) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", *args], cwd=str(cwd), env=env, check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True).stdout.strip()


def write_patch(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


P1 = """diff --git a/a.py b/a.py
--- a/a.py
+++ b/a.py
@@ -1,5 +1,5 @@
 line 1
 line 2
-line 3
+line 3 patched
 line 4
 line 5
"""
# creates a file that the upstream's own .gitignore excludes (as FB-BEV's does with *.json)
P2 = """diff --git a/new.json b/new.json
new file mode 100644
--- /dev/null
+++ b/new.json
@@ -0,0 +1 @@
+{"added": true}
"""
# touches a CRLF file with CRLF lines (FB-BEV has such files): must survive any user autocrlf setting
P3 = "diff --git a/crlf.txt b/crlf.txt\n--- a/crlf.txt\n+++ b/crlf.txt\n@@ -1,2 +1,2 @@\n one\r\n-two\r\n+TWO\r\n"
BAD = """diff --git a/a.py b/a.py
--- a/a.py
+++ b/a.py
@@ -3,3 +3,3 @@
 line 3
-something that is not there
+x
 line 5
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A source repo with the pinned commit *behind* HEAD, patch files, and a registry entry for it."""
    src = tmp_path / "src"
    src.mkdir()
    git(src, "init", "-q")
    (src / "a.py").write_text(ORIGINAL)
    (src / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    (src / ".gitignore").write_text("*.json\n")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "pinned")
    pinned = git(src, "rev-parse", "HEAD")
    tree = git(src, "rev-parse", "HEAD^{tree}")
    (src / "a.py").write_text(ORIGINAL + "line 6 (newer upstream)\n")
    git(src, "commit", "-q", "-am", "newer")
    # from here on, a user-level autocrlf=true must not change the bytes the kit checks out
    cfg = tmp_path / "gitconfig"
    cfg.write_text("[core]\n\tautocrlf = true\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    patches = tmp_path / "kit"
    patches.mkdir()
    write_patch(patches / "p1.patch", P1)
    write_patch(patches / "p2.patch", P2)
    write_patch(patches / "p3.patch", P3)
    write_patch(patches / "bad.patch", BAD)
    up = dataclasses.replace(upstream.UPSTREAMS["FB-BEV"], name="Fake", model="fake", url=str(src),
                             commit=pinned, tree=tree, patches=("p1.patch", "p2.patch", "p3.patch"),
                             patch_root=patches, src_env="FAKE_SRC", src_option="--fake-src")
    return dataclasses.make_dataclass("Fake", ["up", "src", "pinned", "tree", "root"])(
        up, src, pinned, tree, tmp_path)


def quiet(msg):
    pass


def assert_patched(dest: Path, pinned: str):
    assert git(dest, "rev-parse", "HEAD") == pinned
    assert (dest / "a.py").read_text() == ORIGINAL.replace("line 3", "line 3 patched")
    assert (dest / "new.json").read_text() == '{"added": true}\n'
    assert (dest / "crlf.txt").read_bytes() == b"one\r\nTWO\r\n"


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_clone_from_local_source_checks_out_pinned_commit_and_patches(fake):
    dest = fake.root / "co" / "Fake"
    out = upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    assert out == dest
    assert_patched(dest, fake.pinned)  # pinned, not the source's newer HEAD
    st = upstream.status(fake.up, dest)
    assert st.ok and st.state == "patched" and st.commit == fake.pinned
    assert st.patches == [("p1.patch", "applied"), ("p2.patch", "applied"), ("p3.patch", "applied")]
    assert leftovers(dest.parent) == []  # no temporary folders left behind


def test_source_from_environment_variable(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SRC", str(fake.src))
    dest = upstream.materialize(fake.up, dest=fake.root / "co" / "Fake", log=quiet)
    assert_patched(dest, fake.pinned)


def test_second_run_recognizes_applied_patches_and_changes_nothing(fake):
    dest = fake.root / "Fake"
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.iterdir() if p.is_file()}
    logs = []
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=logs.append)
    assert any("3 patch(es) already applied" in m for m in logs), logs
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.iterdir() if p.is_file()}
    assert before == after


def test_wrong_commit_is_refused_with_instructions(fake):
    dest = fake.root / "Fake"
    git(fake.root, "clone", "-q", str(fake.src), str(dest))  # at the newer HEAD, not the pinned commit
    with pytest.raises(UpstreamError, match=r"is at commit .* the kit pins") as exc:
        upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    assert f"checkout --detach {fake.pinned}" in str(exc.value)
    assert "line 6" in (dest / "a.py").read_text()  # untouched
    st = upstream.status(fake.up, dest)
    assert st.state == "wrong-commit" and not st.ok


def test_dirty_tree_is_refused_and_left_alone(fake):
    dest = fake.root / "Fake"
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    (dest / "a.py").write_text("my local edit\n")
    with pytest.raises(UpstreamError, match="has changes that are not the kit's patches: a.py") as exc:
        upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    assert "checkout -- ." in str(exc.value)
    assert (dest / "a.py").read_text() == "my local edit\n"
    st = upstream.status(fake.up, dest)
    assert st.state == "dirty" and st.problems


def test_untracked_user_files_do_not_make_the_tree_dirty(fake):
    dest = fake.root / "Fake"
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    (dest / "work_dirs").mkdir()
    (dest / "work_dirs" / "epoch_1.pth").write_bytes(b"weights")
    assert upstream.status(fake.up, dest).ok


def test_patch_that_does_not_apply_names_file_and_hunk_and_touches_nothing(fake):
    # on a pristine existing checkout: the good patch listed first must not be applied either
    dest = fake.root / "Fake"
    upstream.materialize(dataclasses.replace(fake.up, patches=()), src=str(fake.src), dest=dest, log=quiet)
    broken = dataclasses.replace(fake.up, patches=("p1.patch", "bad.patch"))
    with pytest.raises(PatchDoesNotApply) as exc:
        upstream.materialize(broken, src=str(fake.src), dest=dest, log=quiet)
    msg = str(exc.value)
    assert "bad.patch" in msg and "a.py" in msg and "line 3" in msg and "@@ -3,3 +3,3 @@" in msg
    assert (dest / "a.py").read_text() == ORIGINAL
    assert git(dest, "status", "--porcelain") == ""
    st = upstream.status(broken, dest)
    assert st.state == "bad-patch" and "bad.patch" in st.problems[0][0]


def test_patch_failure_on_fresh_checkout_leaves_no_folder(fake):
    dest = fake.root / "co" / "Fake"
    broken = dataclasses.replace(fake.up, patches=("p1.patch", "bad.patch"))
    with pytest.raises(PatchDoesNotApply, match="a.py"):
        upstream.materialize(broken, src=str(fake.src), dest=dest, log=quiet)
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_missing_listed_patch_is_an_error_but_no_patches_is_fine(fake):
    missing = dataclasses.replace(fake.up, patches=("p1.patch", "gone.patch"))
    with pytest.raises(UpstreamError, match="gone.patch is listed .* but missing"):
        upstream.materialize(missing, src=str(fake.src), dest=fake.root / "x", log=quiet)
    assert not (fake.root / "x").exists()
    none = dataclasses.replace(fake.up, patches=())
    dest = upstream.materialize(none, src=str(fake.src), dest=fake.root / "y", log=quiet)
    assert (dest / "a.py").read_text() == ORIGINAL
    st = upstream.status(none, dest)
    assert st.ok and st.patches == []


def test_new_patch_added_later_is_applied_on_top(fake):
    dest = fake.root / "Fake"
    upstream.materialize(dataclasses.replace(fake.up, patches=("p1.patch",)), src=str(fake.src), dest=dest,
                         log=quiet)
    st = upstream.status(fake.up, dest)
    assert st.state == "partial" and st.applied == 1
    assert st.patches[1] == ("p2.patch", "not applied")
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    assert_patched(dest, fake.pinned)


def test_edited_patch_replaces_its_older_version(fake):
    dest = fake.root / "Fake"
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    write_patch(fake.root / "kit" / "p1.patch", P1.replace("line 3 patched", "line 3 patched v2"))
    assert upstream.status(fake.up, dest).state == "older"
    logs = []
    upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=logs.append)
    assert "line 3 patched v2" in (dest / "a.py").read_text()
    assert any("replaced the older kit patches" in m for m in logs)
    assert upstream.status(fake.up, dest).state == "patched"


def test_bare_repository_source(fake):
    bare = fake.root / "bare.git"
    git(fake.root, "clone", "-q", "--bare", str(fake.src), str(bare))
    dest = upstream.materialize(fake.up, src=str(bare), dest=fake.root / "Fake", log=quiet)
    assert_patched(dest, fake.pinned)


def test_tarball_of_a_clone(fake):
    tgz = fake.root / "src.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(str(fake.src), arcname="Fake")
    dest = upstream.materialize(fake.up, src=str(tgz), dest=fake.root / "co" / "Fake", log=quiet)
    assert_patched(dest, fake.pinned)
    assert git(dest, "remote", "get-url", "origin") == fake.up.url  # not the deleted extraction folder
    assert leftovers(dest.parent) == []


def test_tarball_of_a_bare_repository(fake):
    bare = fake.root / "bare.git"
    git(fake.root, "clone", "-q", "--bare", str(fake.src), str(bare))
    tgz = fake.root / "bare.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(str(bare), arcname="bare.git")
    dest = upstream.materialize(fake.up, src=str(tgz), dest=fake.root / "Fake", log=quiet)
    assert_patched(dest, fake.pinned)


def test_plain_source_archive_is_verified_by_tree(fake):
    # what a hosting site's "download tarball" of the pinned commit contains: files, no history
    good = fake.root / "good.tar"
    git(fake.src, "-c", "core.autocrlf=false", "archive", "--prefix=Fake-abc/", "-o", str(good), fake.pinned)
    dest = upstream.materialize(fake.up, src=str(good), dest=fake.root / "Fake", log=quiet)
    assert (dest / "a.py").read_text() == ORIGINAL.replace("line 3", "line 3 patched")
    st = upstream.status(fake.up, dest)
    assert st.ok and st.state == "patched"
    wrong = fake.root / "wrong.tar"
    git(fake.src, "-c", "core.autocrlf=false", "archive", "--prefix=Fake-new/", "-o", str(wrong), "HEAD")
    with pytest.raises(UpstreamError, match="its files are not Fake at"):
        upstream.materialize(fake.up, src=str(wrong), dest=fake.root / "Other", log=quiet)
    assert not (fake.root / "Other").exists()


def test_source_without_the_pinned_commit(fake):
    other = fake.root / "other"
    other.mkdir()
    git(other, "init", "-q")
    (other / "x").write_text("x")
    git(other, "add", "x")
    git(other, "commit", "-q", "-m", "unrelated")
    with pytest.raises(UpstreamError, match="does not contain Fake commit"):
        upstream.materialize(fake.up, src=str(other), dest=fake.root / "Fake", log=quiet)
    assert not (fake.root / "Fake").exists()


def test_bad_source_names_the_variable(fake):
    with pytest.raises(UpstreamError, match="FAKE_SRC"):
        upstream.materialize(fake.up, src=str(fake.root / "nope"), dest=fake.root / "Fake", log=quiet)
    with pytest.raises(UpstreamError, match="FAKE_SRC"):  # git URL that cannot be cloned
        upstream.materialize(fake.up, src=f"file://{fake.root}/nope.git", dest=fake.root / "Fake", log=quiet)


def test_existing_folder_that_is_not_a_checkout_is_refused(fake):
    dest = fake.root / "Fake"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(UpstreamError, match="not a git checkout"):
        upstream.materialize(fake.up, src=str(fake.src), dest=dest, log=quiet)
    assert (dest / "notes.txt").read_text() == "mine"


def test_status_of_missing_checkout_says_how_to_fix(fake):
    st = upstream.status(fake.up, fake.root / "absent")
    assert not st.ok and st.state == "missing"
    assert "--fake-src" in st.problems[0][1] and "FAKE_SRC" in st.problems[0][1]


def test_status_cli_exit_codes(tmp_path, capsys, monkeypatch):
    assert upstream.main(["--upstream-dir", str(tmp_path), "status"]) == 1
    out = capsys.readouterr().out
    assert "FB-BEV" in out and "BEVDepth" in out and "PROBLEM" in out and "FBBEV_SRC" in out
    assert upstream.main(["list"]) == 0
    assert "6e25469256d98e7fcb52cc43efe812dc2fd2b446" in capsys.readouterr().out


def test_registry_pins_and_lookups():
    assert upstream.UPSTREAMS["FB-BEV"].commit == "6e25469256d98e7fcb52cc43efe812dc2fd2b446"
    assert upstream.UPSTREAMS["BEVDepth"].commit == "d78c7b58b10b9ada940462ba83ab24d99cae5833"
    assert upstream.get("fbocc") is upstream.UPSTREAMS["FB-BEV"]
    assert upstream.get("BEVDEPTH") is upstream.UPSTREAMS["BEVDepth"]
    with pytest.raises(KeyError, match="known"):
        upstream.get("yolo")
    for up in upstream.UPSTREAMS.values():
        upstream.patch_files(up)  # every listed patch file ships with the kit
        assert up.url.startswith("https://") and up.src_env and up.src_option


def test_checkout_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(upstream.UPSTREAM_DIR_ENV, str(tmp_path))
    assert upstream.checkout_dir("fbocc") == tmp_path / "FB-BEV"
    assert upstream.pythonpath("bevdepth") == [(tmp_path / "BEVDepth").resolve()]


@pytest.mark.upstream
def test_real_fbbev_checkout(fbbev_checkout):
    st = upstream.status("FB-BEV", fbbev_checkout)
    assert st.ok, st.problems
    assert st.commit == upstream.UPSTREAMS["FB-BEV"].commit


@pytest.mark.upstream
def test_real_bevdepth_checkout(bevdepth_checkout):
    st = upstream.status("BEVDepth", bevdepth_checkout)
    assert st.ok, st.problems
    assert st.commit == upstream.UPSTREAMS["BEVDepth"].commit


def test_patch_regenerated_from_the_checkout_then_edited_again(fake):
    """The developer loop of patches/README.md: edit the checkout, `git diff > patch`, later edit the patch."""
    up = dataclasses.replace(fake.up, patches=("p1.patch",))
    dest = upstream.materialize(up, src=str(fake.src), dest=fake.root / "Fake", log=quiet)
    (dest / "a.py").write_text((dest / "a.py").read_text().replace("line 5", "line 5 edited"))
    (fake.root / "kit" / "p1.patch").write_text(git(dest, "diff") + "\n")
    assert upstream.status(up, dest).state == "patched"
    upstream.materialize(up, src=str(fake.src), dest=dest, log=quiet)  # records the regenerated patch
    patch = (fake.root / "kit" / "p1.patch").read_text()
    (fake.root / "kit" / "p1.patch").write_text(patch.replace("+line 5 edited", "+line 5 edited twice"))
    assert upstream.status(up, dest).state == "older"
    upstream.materialize(up, src=str(fake.src), dest=dest, log=quiet)
    assert "line 5 edited twice" in (dest / "a.py").read_text()
    assert upstream.status(up, dest).state == "patched"
