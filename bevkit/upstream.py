"""Upstream sources: the single registry, and materialize / verify / patch / status.

Each model runs the upstream code (FB-BEV, BEVDepth) from a checkout at a pinned commit with the kit's
patch files applied. The checkout is *derived* state: this module can always tell, from git alone, whether
it is exactly "pinned commit + the first k kit patches" or something else. It never guesses and never
leaves a half-applied tree:

- a new checkout is prepared in a temporary folder next to the destination and renamed into place only
  once the commit is verified and every patch applied;
- patches are checked together against a throw-away index (``git apply --cached``) before the working
  tree is touched, then applied with one ``git apply`` call (which is all-or-nothing);
- a checkout that is neither pristine nor exactly patched is refused, naming the files that differ.

Sources: a git URL (default), a local clone, a bare git directory, a tarball of either, or a plain source
archive (e.g. GitHub's "download tarball"), which is accepted when its files hash to the pinned commit's
tree. CLI: ``python -m bevkit.upstream {status,materialize,install,list}``.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from bevkit import REPO_ROOT
from bevkit.registry import Upstream, all_specs

#: Where checkouts live (default: <repo>/upstream). Tests and side-by-side installs point it elsewhere.
UPSTREAM_DIR_ENV = "BEVKIT_UPSTREAM_DIR"
#: Inside the checkout's git dir: copies of the patch files last applied (lets an edited patch replace
#: its older version cleanly).
_APPLIED_DIR = "bevkit-applied"
# Fixed identity and dates: importing the same archive twice gives the same commit.
_IMPORT_ENV = {
    "GIT_AUTHOR_NAME": "bevkit", "GIT_AUTHOR_EMAIL": "bevkit@localhost",
    "GIT_COMMITTER_NAME": "bevkit", "GIT_COMMITTER_EMAIL": "bevkit@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}


#: The registry, built from the model specs (each model defines its pinned upstream in
#: ``bevkit/models/<name>/__init__.py``). Patch files belong to the model folders; a listed file that is missing
#: is an error.
UPSTREAMS: Dict[str, Upstream] = {spec.upstream.name: spec.upstream for spec in all_specs()
                                  if isinstance(spec.upstream, Upstream)}


class UpstreamError(RuntimeError):
    """Something about an upstream checkout or source is wrong; the message says what to do."""


class PatchDoesNotApply(UpstreamError):
    """A kit patch does not apply to the pinned commit (message names the patch, file and hunk)."""


# ----------------------------------------------------------------------------------------------- lookup

def get(name: Union[str, Upstream]) -> Upstream:
    """Registry entry by upstream name ('FB-BEV') or model name ('fbocc'), case-insensitive."""
    if isinstance(name, Upstream):
        return name
    for up in UPSTREAMS.values():
        if name.lower() in (up.name.lower(), up.model.lower()):
            return up
    known = ", ".join(f"{u.name} ({u.model})" for u in UPSTREAMS.values())
    raise KeyError(f"unknown upstream {name!r}; known: {known}")


def upstream_root() -> Path:
    env = os.environ.get(UPSTREAM_DIR_ENV)
    return Path(env).resolve() if env else REPO_ROOT / "upstream"


def checkout_dir(name: Union[str, Upstream], root: Optional[Path] = None) -> Path:
    """Where the checkout of ``name`` lives (``upstream/<name>`` unless overridden)."""
    return Path(root or upstream_root()) / get(name).name


def pythonpath(name: Union[str, Upstream], dest: Optional[Path] = None) -> List[Path]:
    """PYTHONPATH entries (first) for running the upstream from its checkout."""
    up = get(name)
    base = Path(dest) if dest else checkout_dir(up)
    return [(base / p).resolve() for p in up.pythonpath]


def patch_files(up: Upstream) -> List[Path]:
    files = []
    for rel in up.patches:
        path = Path(up.patch_root) / rel
        if not path.is_file():
            raise UpstreamError(
                f"{up.name}: patch file {rel} is listed in the upstream registry but missing "
                f"(looked in {path.parent}); restore it (git checkout -- {rel}) or drop it from the registry")
        files.append(path)
    return files


# ------------------------------------------------------------------------------------------------- git

def _git(args: Sequence[str], cwd: Optional[Path] = None, env: Optional[dict] = None,
         check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update({"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"})
    full_env.update(env or {})
    # autocrlf off: checkouts must hold the upstream's bytes (FB-BEV has CRLF files the patches rely on).
    cmd = ["git", "-c", "core.autocrlf=false", "-c", "advice.detachedHead=false", *args]
    proc = subprocess.run(cmd, cwd=str(cwd) if cwd else None, env=full_env, input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def _is_git_dir(path: Path) -> bool:
    """True for a work tree with .git or a bare repository."""
    if (path / ".git").exists():
        return True
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return _git(["rev-parse", "--is-bare-repository"], cwd=path, check=False).stdout.strip() == "true"
    return False


def _git_dir(repo: Path) -> Path:
    out = _git(["rev-parse", "--git-dir"], cwd=repo).stdout.strip()
    return (repo / out).resolve()


def _head(repo: Path) -> Optional[str]:
    proc = _git(["rev-parse", "--verify", "-q", "HEAD"], cwd=repo, check=False)
    return proc.stdout.strip() or None


def _tree_of(repo: Path, rev: str) -> str:
    return _git(["rev-parse", f"{rev}^{{tree}}"], cwd=repo).stdout.strip()


def _patch_paths(patch: Path) -> List[str]:
    """Files a patch touches (both sides), from its headers."""
    paths = []
    for line in patch.read_text(errors="replace").splitlines():
        for prefix, strip in (("--- a/", 6), ("+++ b/", 6), ("rename to ", 10), ("copy to ", 8)):
            if line.startswith(prefix):
                p = line[strip:].split("\t")[0].rstrip("\r")
                if p not in paths:
                    paths.append(p)
    return paths


def _hunk_for(patch: Path, path: str, line_no: str) -> str:
    """The '@@ ... @@' header of the hunk of ``patch`` starting at ``line_no`` of ``path``."""
    current = None
    for line in patch.read_text(errors="replace").splitlines():
        if line.startswith("+++ ") or line.startswith("--- a/"):
            name = line[4:].split("\t")[0]
            current = name[2:] if name[:2] in ("a/", "b/") else name
        elif line.startswith("@@") and current == path:
            m = re.match(r"@@ -(\d+)", line)
            if m and m.group(1) == line_no:
                return line.rstrip("\r")
    return ""


def _explain_apply_failure(patch: Path, stderr: str) -> str:
    m = re.search(r"patch failed: (.+):(\d+)", stderr)
    where = ""
    if m:
        hunk = _hunk_for(patch, m.group(1), m.group(2))
        where = f" at {m.group(1)} line {m.group(2)}" + (f" (hunk {hunk})" if hunk else "")
    else:
        m = re.search(r"error: (.+?): (does not exist in index|already exists in index|No such file)", stderr)
        if m:
            where = f" at {m.group(1)} ({m.group(2)})"
    detail = " | ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())
    return f"patch {patch.name} does not apply{where}: {detail}"


# ------------------------------------------------------------------------------------- tree arithmetic

def _expected_trees(repo: Path, base: str, patches: Sequence[Path]) -> List[str]:
    """[tree of base, tree after patch 1, ..., after patch n], computed in a throw-away index.

    Raises PatchDoesNotApply (naming file and hunk) if a patch does not apply; the work tree and the
    checkout's own index are never touched.
    """
    with tempfile.TemporaryDirectory(prefix="bevkit-index-") as tmp:
        env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        _git(["read-tree", base], cwd=repo, env=env)
        trees = [_git(["write-tree"], cwd=repo, env=env).stdout.strip()]
        for patch in patches:
            proc = _git(["apply", "--cached", str(patch)], cwd=repo, env=env, check=False)
            if proc.returncode != 0:
                raise PatchDoesNotApply(_explain_apply_failure(patch, proc.stderr))
            trees.append(_git(["write-tree"], cwd=repo, env=env).stdout.strip())
    return trees


def _worktree_tree(repo: Path, extra_paths: Sequence[str]) -> str:
    """Tree id of the work tree: tracked files, plus ``extra_paths`` (files kit patches create).

    Other untracked files (build outputs, work_dirs, checkpoints) do not count: they are the user's.
    """
    with tempfile.TemporaryDirectory(prefix="bevkit-index-") as tmp:
        env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        _git(["read-tree", "HEAD"], cwd=repo, env=env)
        _git(["add", "-u"], cwd=repo, env=env)
        present = [p for p in extra_paths if (repo / p).exists() or (repo / p).is_symlink()]
        if present:
            _git(["add", "-f", "--", *present], cwd=repo, env=env)
        return _git(["write-tree"], cwd=repo, env=env).stdout.strip()


def _changed_files(repo: Path, tree_a: str, tree_b: str) -> List[str]:
    out = _git(["diff", "--name-only", tree_a, tree_b], cwd=repo).stdout
    return [line for line in out.splitlines() if line]


def _applied_record(repo: Path) -> List[Path]:
    """Copies of the patch files last applied by the kit (in order), or []."""
    folder = _git_dir(repo) / _APPLIED_DIR
    series = folder / "series.json"
    if not series.is_file():
        return []
    try:
        names = json.loads(series.read_text())
    except ValueError:
        return []
    files = [folder / n for n in names]
    return files if all(f.is_file() for f in files) else []


def _write_applied_record(repo: Path, patches: Sequence[Path]) -> None:
    folder = _git_dir(repo) / _APPLIED_DIR
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    names = []
    for i, patch in enumerate(patches):
        name = f"{i:02d}-{patch.name}"
        shutil.copyfile(patch, folder / name)
        names.append(name)
    (folder / "series.json").write_text(json.dumps(names))


# ----------------------------------------------------------------------------------------------- status

@dataclass
class UpstreamStatus:
    name: str
    model: str
    path: Path
    expected_commit: str
    exists: bool = False
    commit: Optional[str] = None
    #: (patch file relative to the kit, 'applied' / 'not applied' / 'missing' / 'unknown')
    patches: List[Tuple[str, str]] = field(default_factory=list)
    #: (what is wrong, the fix)
    problems: List[Tuple[str, str]] = field(default_factory=list)
    #: how many of the patches are applied (None when the tree matches no known state)
    applied: Optional[int] = None
    #: 'missing', 'not-git', 'wrong-commit', 'bad-patch', 'partial' (some patches to apply), 'patched',
    #: 'older' (an older version of the kit patches is applied), 'dirty'
    state: str = "missing"

    @property
    def ok(self) -> bool:
        return not self.problems


def _materialize_fix(up: Upstream) -> str:
    return (f"run `bash setup.sh --models {up.model}` (offline: add {up.src_option} PATH or set "
            f"{up.src_env}=PATH, a clone, bare git dir or tarball)")


def _inspect(up: Upstream, dest: Path) -> Tuple[UpstreamStatus, List[Path], List[str]]:
    """Read-only analysis shared by status() and materialize(); returns (status, patch files, trees)."""
    st = UpstreamStatus(up.name, up.model, dest, up.commit)
    st.exists = dest.exists()
    try:
        files = patch_files(up)
    except UpstreamError as exc:
        st.problems.append((str(exc), "restore the patch file from the kit's git history"))
        st.patches = [(rel, "missing" if not (Path(up.patch_root) / rel).is_file() else "unknown")
                      for rel in up.patches]
        st.state = "bad-patch"
        files = []
        if not st.exists:
            return st, files, []
    if not st.exists:
        st.state = "missing"
        st.patches = st.patches or [(rel, "not applied") for rel in up.patches]
        st.problems.append((f"{up.name} is not checked out at {dest}", _materialize_fix(up)))
        return st, files, []
    if not (dest / ".git").exists():
        st.state = "not-git"
        st.problems.append((f"{dest} exists but is not a git checkout",
                            f"move it away (it may hold your work), then {_materialize_fix(up)}"))
        return st, files, []
    st.commit = _head(dest)
    head_tree = _tree_of(dest, "HEAD") if st.commit else None
    if st.commit != up.commit and head_tree != up.tree:
        st.state = "wrong-commit"
        st.problems.append((
            f"{dest} is at commit {(st.commit or 'none')[:12]}, the kit pins {up.commit[:12]}",
            f"run `git -C {dest} checkout --detach {up.commit}` (keep your changes elsewhere first), "
            f"or move {dest} away and {_materialize_fix(up)}"))
        st.patches = st.patches or [(rel, "unknown") for rel in up.patches]
        return st, files, []
    if st.problems:  # missing patch file: cannot say more
        return st, files, []
    try:
        trees = _expected_trees(dest, "HEAD", files)
    except PatchDoesNotApply as exc:
        st.state = "bad-patch"
        st.problems.append((f"{up.name}: {exc}", "fix the patch (regenerate it against the pinned commit)"))
        st.patches = [(rel, "unknown") for rel in up.patches]
        return st, files, []
    extra = []
    for f in list(files) + _applied_record(dest):
        extra += [p for p in _patch_paths(f) if p not in extra]
    current = _worktree_tree(dest, extra)
    if current in trees:
        st.applied = trees.index(current)
        st.patches = [(rel, "applied" if i < st.applied else "not applied") for i, rel in enumerate(up.patches)]
        st.state = "patched" if st.applied == len(files) else "partial"
        if st.state == "partial":
            st.problems.append((f"{up.name}: {len(files) - st.applied} kit patch(es) not applied",
                                _materialize_fix(up)))
        return st, files, trees
    st.patches = [(rel, "unknown") for rel in up.patches]
    record = _applied_record(dest)
    if record:
        try:
            old = _expected_trees(dest, "HEAD", record)
        except PatchDoesNotApply:
            old = []
        if old and current == old[-1]:
            st.state = "older"
            st.problems.append((f"{up.name}: an older version of the kit patches is applied",
                                _materialize_fix(up) + " to replace it"))
            return st, files, trees
    st.state = "dirty"
    changed = _changed_files(dest, trees[-1], current)
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    where = "" if dest == checkout_dir(up) else f" --upstream-dir {dest.parent}"
    st.problems.append((
        f"{dest} has changes that are not the kit's patches: {shown}",
        f"save them with `tools/upstream{where} diff {up.name} > my.patch` (only your changes, against the "
        f"kit-patched state; a plain `git diff` would also hold the kit's patch), restore the files with "
        f"`git -C {dest} checkout -- .` (and remove files the patches add), rerun setup.sh, then "
        f"`git -C {dest} apply my.patch` puts your changes back"))
    return st, files, trees


def local_diff(name: Union[str, Upstream], dest: Optional[Path] = None) -> bytes:
    """Your changes in a checkout as a patch against the kit-patched state (pinned commit + every kit patch):
    tracked files and the files the kit patches add; ``git apply`` puts them back on a fresh checkout."""
    up = get(name)
    dest = Path(dest) if dest else checkout_dir(up)
    if not (dest / ".git").exists():
        raise UpstreamError(f"{dest} is not a git checkout of {up.name}")
    patched = _expected_trees(dest, "HEAD", patch_files(up))[-1]
    with tempfile.TemporaryDirectory(prefix="bevkit-index-") as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"), LC_ALL="C")
        _git(["read-tree", patched], cwd=dest, env=env)
        # bytes, not text: FB-BEV has CRLF files, and the patch must keep them
        proc = subprocess.run(["git", "-c", "core.autocrlf=false", "diff", "--binary"], cwd=str(dest), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise UpstreamError(f"git diff failed in {dest}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def status(name: Union[str, Upstream], dest: Optional[Path] = None) -> UpstreamStatus:
    """Where the checkout is, its commit, which patches are applied, and what is wrong (read-only)."""
    up = get(name)
    dest = Path(dest) if dest else checkout_dir(up)
    return _inspect(up, dest)[0]


# ------------------------------------------------------------------------------------------ materialize

def _safe_extract(archive: Path, out: Path) -> None:
    """Extract a tarball into ``out``; a damaged tarball or a member that would land outside ``out`` (``../``,
    absolute paths, links out) is refused with one message naming the tarball."""
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(out, filter="tar")  # refuses members that would land outside ``out``
                return
            # Python without extraction filters: refuse paths that escape
            base = str(out.resolve())
            for member in tar.getmembers():
                target = str((out / member.name).resolve())
                if os.path.commonpath([base, target]) != base:
                    raise UpstreamError(f"{archive}: refused: member {member.name!r} would be written outside the "
                                        f"extraction folder (an unsafe tarball); make one with `tar -C DIR -czf "
                                        f"FILE.tar.gz .` from a clone or bare git dir")
            tar.extractall(out)
    except UpstreamError:
        raise
    except getattr(tarfile, "FilterError", ()) as e:
        raise UpstreamError(f"{archive}: refused: member {e.tarinfo.name!r} would be written outside the extraction "
                            f"folder ({type(e).__name__}: an unsafe tarball); make one with `tar -C DIR -czf "
                            f"FILE.tar.gz .` from a clone or bare git dir") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        raise UpstreamError(f"{archive}: the tarball is truncated or damaged ({type(e).__name__}: {e}); download or "
                            f"copy it again") from None


def _single_root(folder: Path) -> Path:
    entries = [e for e in folder.iterdir() if e.name not in ("pax_global_header",)]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _import_plain_tree(src: Path, tmp: Path, up: Upstream, what: str) -> None:
    """A source tree without git history (e.g. an extracted source archive): verify by tree id."""
    shutil.copytree(str(src), str(tmp), symlinks=True)
    _git(["init", "-q"], cwd=tmp)
    # -f: FB-BEV tracks files its own .gitignore excludes (*.json, *.png).
    _git(["add", "-A", "-f"], cwd=tmp)
    tree = _git(["write-tree"], cwd=tmp).stdout.strip()
    if tree != up.tree:
        raise UpstreamError(
            f"{what} has no git history and its files are not {up.name} at {up.commit[:12]} "
            f"(tree {tree[:12]}, expected {up.tree[:12]}): use a clone, a bare git dir, or an archive of "
            f"exactly that commit")
    commit = _git(["commit-tree", tree, "-m", f"{up.name} {up.commit} from a source archive (tree verified)"],
                  cwd=tmp, env=_IMPORT_ENV).stdout.strip()
    _git(["update-ref", "HEAD", commit], cwd=tmp)
    _git(["reset", "-q"], cwd=tmp)  # index = HEAD, so `git status` in the checkout is clean


def _clone(src: str, tmp: Path, up: Upstream, what: str) -> None:
    proc = _git(["clone", "-q", "--no-checkout", src, str(tmp)], check=False)
    if proc.returncode != 0:
        raise UpstreamError(
            f"could not clone {up.name} from {what}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}. "
            f"Offline? pass {up.src_option} PATH or set {up.src_env}=PATH (a clone, bare git dir or tarball)")
    if _git(["cat-file", "-e", f"{up.commit}^{{commit}}"], cwd=tmp, check=False).returncode != 0:
        # not reachable from the source's branches: ask for it by id
        _git(["fetch", "-q", "origin", up.commit], cwd=tmp, check=False)
    if _git(["cat-file", "-e", f"{up.commit}^{{commit}}"], cwd=tmp, check=False).returncode != 0:
        raise UpstreamError(
            f"{what} does not contain {up.name} commit {up.commit}: update that clone "
            f"(git -C <clone> fetch origin) or use a fresh clone of {up.url}")
    _git(["checkout", "-q", "--detach", up.commit], cwd=tmp)


def _fetch_into(src: str, tmp: Path, up: Upstream, log: Callable[[str], None]) -> None:
    path = Path(src).expanduser()
    if path.is_file():
        try:
            is_tar = tarfile.is_tarfile(str(path))
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:  # cut inside the first block
            raise UpstreamError(f"{src}: the tarball is truncated or damaged ({type(e).__name__}: {e}); download "
                                f"or copy it again") from None
        if not is_tar:
            raise UpstreamError(f"{src} is a file but not a tarball; {up.src_env} must name a clone, "
                                f"a bare git dir or a tarball (.tar, .tar.gz, .tgz, .tar.xz)")
        extract = Path(tempfile.mkdtemp(prefix=f".{up.name}.extract-", dir=str(tmp.parent)))
        try:
            _safe_extract(path, extract)
            root = _single_root(extract)
            if _is_git_dir(root):
                _clone(str(root), tmp, up, f"{src} (tarball)")
                _git(["remote", "set-url", "origin", up.url], cwd=tmp)
                log(f"upstream {up.name}: unpacked git repository from tarball {src}")
            else:
                _import_plain_tree(root, tmp, up, f"{src} (tarball)")
                log(f"upstream {up.name}: unpacked source archive {src} (tree verified)")
        finally:
            shutil.rmtree(extract, ignore_errors=True)
    elif path.is_dir():
        if _is_git_dir(path):
            _clone(str(path.resolve()), tmp, up, str(src))
            log(f"upstream {up.name}: cloned from local repository {src}")
        else:
            _import_plain_tree(path, tmp, up, str(src))
            log(f"upstream {up.name}: imported source tree {src} (tree verified)")
    elif re.match(r"^(https?|ssh|git|file)://|^[\w.-]+@[\w.-]+:", src):
        log(f"upstream {up.name}: cloning {src}")
        _clone(src, tmp, up, src)
    else:
        raise UpstreamError(f"{up.name} source {src!r} does not exist; {up.src_env} / {up.src_option} must name "
                            f"a clone, a bare git dir, a tarball or a git URL")


def _apply(dest: Path, up: Upstream, files: List[Path], trees: List[str], st: UpstreamStatus,
           log: Callable[[str], None]) -> None:
    """Bring a verified checkout from its current known state to 'all patches applied'."""
    if st.applied is not None:
        todo = files[st.applied:]
        if not todo:
            if [f.read_bytes() for f in _applied_record(dest)] != [f.read_bytes() for f in files]:
                _write_applied_record(dest, files)  # e.g. the patch was regenerated from this checkout
            log(f"upstream {up.name}: {len(files)} patch(es) already applied" if files
                else f"upstream {up.name}: no kit patches to apply")
            return
        args = [str(f) for f in todo]
        proc = _git(["apply", "--check", *args], cwd=dest, check=False)
        if proc.returncode != 0:
            bad = next((f for f in todo if f.name in proc.stderr), todo[0])
            raise PatchDoesNotApply(_explain_apply_failure(bad, proc.stderr))
        _git(["apply", *args], cwd=dest)  # one call: all or nothing
        _write_applied_record(dest, files)
        log(f"upstream {up.name}: applied {', '.join(f.name for f in todo)}")
        return
    # an older version of the kit patches is applied: take it off, then put the new one on
    old = _applied_record(dest)
    args_old = [str(f) for f in reversed(old)]
    _git(["apply", "-R", *args_old], cwd=dest)
    proc = _git(["apply", *[str(f) for f in files]], cwd=dest, check=False)
    if proc.returncode != 0:
        _git(["apply", *[str(f) for f in old]], cwd=dest)  # put the tree back as it was
        raise PatchDoesNotApply(_explain_apply_failure(files[0], proc.stderr))
    _write_applied_record(dest, files)
    log(f"upstream {up.name}: replaced the older kit patches with {', '.join(f.name for f in files)}")


def materialize(name: Union[str, Upstream], src: Optional[str] = None, dest: Optional[Path] = None,
                log: Callable[[str], None] = print) -> Path:
    """Make ``dest`` a checkout of the pinned commit with every kit patch applied; return it.

    ``src``: a git URL, local clone, bare git dir or tarball (default: the upstream's env var, then its
    URL). An existing checkout is verified, never re-fetched; running this twice changes nothing.
    """
    up = get(name)
    dest = Path(dest) if dest else checkout_dir(up)
    files = patch_files(up)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # an empty folder holds nothing of the user's
    if dest.exists():
        st, files, trees = _inspect(up, dest)
        if st.state not in ("patched", "partial", "older"):
            msg, fix = st.problems[0]
            error = PatchDoesNotApply if st.state == "bad-patch" else UpstreamError
            raise error(f"{msg}. To fix: {fix}")
        _apply(dest, up, files, trees, st, log)
        return dest
    src = src or os.environ.get(up.src_env) or up.url
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{up.name}.tmp-", dir=str(dest.parent)))
    tmp.rmdir()  # git clone / copytree want to create it
    try:
        _fetch_into(src, tmp, up, log)
        head, head_tree = _head(tmp), _tree_of(tmp, "HEAD")
        if head != up.commit and head_tree != up.tree:
            raise UpstreamError(f"{src} gave commit {head} instead of {up.commit}")
        trees = _expected_trees(tmp, "HEAD", files)  # raises before the tree is touched
        st = UpstreamStatus(up.name, up.model, tmp, up.commit, exists=True, commit=head, applied=0)
        _apply(tmp, up, files, trees, st, log)
        os.rename(str(tmp), str(dest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"upstream {up.name}: ready at {dest} (commit {up.commit[:12]})")
    return dest


# --------------------------------------------------------------------------------------------- install

def install(name: Union[str, Upstream], profile: str, dest: Optional[Path] = None,
            python: str = sys.executable, log: Callable[[str], None] = print) -> None:
    """The upstream's own build step, where it can run: CUDA extensions in place on ``cuda`` only.

    The upstreams are never pip-installed (see ``Upstream.pythonpath``); elsewhere the kit's ops stand in
    for their CUDA kernels.
    """
    up = get(name)
    dest = Path(dest) if dest else checkout_dir(up)
    if profile not in up.build_profiles:
        log(f"upstream {up.name}: nothing to build on {profile} (runs from {dest} via PYTHONPATH; "
            f"its CUDA extension is replaced by bevkit.ops)")
        return
    stamp = _git_dir(dest) / "bevkit-built"
    key = f"{profile} {_worktree_tree(dest, [])}"
    if stamp.is_file() and stamp.read_text() == key:
        log(f"upstream {up.name}: extensions already built")
        return
    log(f"upstream {up.name}: building its CUDA extensions in place ({' '.join(up.build_command)})")
    subprocess.run([python, *up.build_command], cwd=str(dest), check=True)
    stamp.write_text(key)


# ------------------------------------------------------------------------------------------------- CLI

def _print_status(sts: List[UpstreamStatus], out=None) -> None:
    out = out or sys.stdout
    for st in sts:
        print(f"{st.name} ({st.model})", file=out)
        print(f"  checkout : {st.path}{'' if st.exists else '  (missing)'}", file=out)
        commit = st.commit or "-"
        mark = "ok" if st.commit == st.expected_commit else f"expected {st.expected_commit}"
        print(f"  commit   : {commit}  ({mark})", file=out)
        if st.patches:
            for rel, state in st.patches:
                print(f"  patch    : {rel}: {state}", file=out)
        else:
            print("  patch    : (none registered)", file=out)
        for msg, fix in st.problems:
            print(f"  PROBLEM  : {msg}", file=out)
            print(f"  fix      : {fix}", file=out)
        if not st.problems:
            print("  status   : ok", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--upstream-dir", type=Path, default=None,
                        help=f"folder holding the checkouts (default: ${UPSTREAM_DIR_ENV} or <repo>/upstream)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="per upstream: checkout, commit, patches, problems (exit 1 on any)")
    p.add_argument("names", nargs="*", help="upstream or model names (default: all)")
    p = sub.add_parser("materialize", help="clone/verify/patch one upstream")
    p.add_argument("name")
    p.add_argument("--src", help="git URL, local clone, bare git dir or tarball (default: $<NAME>_SRC, then the URL)")
    p.add_argument("--dest", type=Path, help="checkout folder (default: <upstream-dir>/<name>)")
    p = sub.add_parser("install", help="the upstream's own build step for a profile")
    p.add_argument("name")
    p.add_argument("--profile", required=True, choices=("npu", "cuda", "cpu"))
    p = sub.add_parser("diff", help="your changes in a checkout against the kit-patched state (> my.patch)")
    p.add_argument("name")
    p = sub.add_parser("list", help="the registry")
    p = sub.add_parser("pythonpath", help="PYTHONPATH entries for running an upstream from its checkout")
    p.add_argument("name")
    args = parser.parse_args(argv)
    root = args.upstream_dir.resolve() if args.upstream_dir else None
    try:
        if args.cmd == "status":
            names = args.names or list(UPSTREAMS)
            sts = [status(n, checkout_dir(n, root)) for n in names]
            _print_status(sts)
            return 0 if all(s.ok for s in sts) else 1
        if args.cmd == "materialize":
            materialize(args.name, src=args.src, dest=args.dest or checkout_dir(args.name, root))
            return 0
        if args.cmd == "install":
            install(args.name, args.profile, checkout_dir(args.name, root))
            return 0
        if args.cmd == "diff":
            sys.stdout.flush()
            sys.stdout.buffer.write(local_diff(args.name, checkout_dir(args.name, root)))
            return 0
        if args.cmd == "pythonpath":
            print(os.pathsep.join(str(p) for p in pythonpath(args.name, checkout_dir(args.name, root))))
            return 0
        for up in UPSTREAMS.values():
            print(f"{up.name}\tmodel={up.model}\tcommit={up.commit}\turl={up.url}\tsource={up.src_env}\t"
                  f"patches={','.join(up.patches) or '-'}")
        return 0
    except (UpstreamError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a half-made checkout was removed; setup.sh says what to do
        return 130


if __name__ == "__main__":
    sys.exit(main())
