"""Bad inputs as a user gives them (issue 12): each case runs the kit's own command in a subprocess (tools/launch,
tools/upstream, setup.sh) and checks the one line that says what is wrong, with which file, and the fix; the
documented exit code (README "Exit codes"); and that nothing the user had changed (sha256 and mode of every file,
folder and link the case touches, before and after; nothing new either, unless the case says so).

The table (``CASES``) runs the cheap ones; cases that need a signal, several commands or the real upstream code are
their own tests below. The launch cases use the toy model (test/assets/toy_spec.py: no upstream). The case needing
the upstream data loaders (child processes) is marked ``upstream``. No training run of its own (CI time): the FB-OCC
smoke test (test_fbocc_smoke.py) runs on a data root whose path holds a comma and a space; FB-OCC --max-steps saving
latest.pth is test_timing.py's mmcv hook test. Duration on 2 busy cores: about 1-2 minutes.
Checkpoint cases (truncated, foreign, --trust-checkpoint) live in test_bad_inputs_checkpoints.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from bevkit import REPO_ROOT

LAUNCH = str(REPO_ROOT / "tools" / "launch")
UPSTREAM = str(REPO_ROOT / "tools" / "upstream")
TOY = str(REPO_ROOT / "test" / "assets" / "toy_spec.py") + ":SPEC"


# ------------------------------------------------------------------------------------------------- helpers
def snapshot(*roots) -> dict:
    """What is at each root: every file's sha256 and mode, every folder's mode, every link's target."""
    out = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        below = sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else []
        for p in [root] + below:
            mode = oct(p.lstat().st_mode & 0o7777)
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = ("dir", mode)
    return out


def kit_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env.update(BEVKIT_PYTHON=sys.executable, **{k: str(v) for k, v in extra.items()})
    env.pop("BEVKIT_EMULATE_DEVICE", None)
    return env


def lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


def toy_launch(data: Path, runs: Path, *options, extra=()) -> List[str]:
    return [LAUNCH, "--spec", TOY, "--device", "cpu", "--nproc", "1", "--data-root", str(data),
            "--work-dir", str(runs), *options, "--", *extra]


def results_of(stdout: str) -> dict:
    last = [line for line in stdout.splitlines() if line.startswith("results: ")]
    assert last, stdout[-3000:]
    return json.loads(Path(last[-1][len("results: "):]).read_text())


def tarball(path: Path, members: dict) -> Path:
    """A .tar.gz holding ``members`` (name -> bytes), names as given (also '../...')."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    argv: List[str]
    code: int
    error: str                       # regex: stderr is exactly one line matching it (None: see ``check``)
    watched: List[Path]              # what the user had: must be byte-identical afterwards (nothing added)
    env: dict = field(default_factory=dict)
    check: Optional[Callable[[subprocess.CompletedProcess], None]] = None  # more assertions


def work_dir_is_a_file(tmp: Path) -> Case:
    (tmp / "data").mkdir()
    (tmp / "runs").write_text("my notes\n")
    return Case(toy_launch(tmp / "data", tmp / "runs", "--mode", "performance"), 2,
                rf"^error: --work-dir {tmp}/runs is a file, not a folder: pass a folder \(each run gets a new "
                rf"folder inside it\)$", [tmp])


def work_dir_inside_a_file(tmp: Path) -> Case:
    (tmp / "data").mkdir()
    (tmp / "runs").write_text("my notes\n")
    return Case(toy_launch(tmp / "data", tmp / "runs" / "fbocc", "--mode", "smoke"), 2,
                rf"^error: --work-dir {tmp}/runs/fbocc is inside {tmp}/runs, which is a file, not a folder", [tmp])


def data_root_is_a_file(tmp: Path) -> Case:
    (tmp / "nuscenes.tgz").write_bytes(b"\x1f\x8b not a folder")
    return Case(toy_launch(tmp / "nuscenes.tgz", tmp / "runs", "--mode", "performance"), 2,
                rf"^error: data root {tmp}/nuscenes.tgz is a file, not a folder: pass --data-root DIR, the "
                r"folder that holds v1.0-trainval/ and samples/$", [tmp])


def truncated_upstream_tarball(tmp: Path) -> Case:
    whole = tarball(tmp / "whole.tar.gz", {"FB-BEV.git/HEAD": b"ref: refs/heads/main\n",
                                           "FB-BEV.git/objects/pack/x.pack": os.urandom(300_000)})
    cut = tmp / "FB-BEV.git.tar.gz"
    cut.write_bytes(whole.read_bytes()[:150_000])
    whole.unlink()
    (tmp / "upstream").mkdir()
    (tmp / "upstream" / "my-notes.txt").write_text("mine\n")
    return Case([UPSTREAM, "--upstream-dir", str(tmp / "upstream"), "materialize", "FB-BEV", "--src", str(cut)], 2,
                rf"^error: {cut}: the tarball is truncated or damaged \(.*\); download or copy it again$", [tmp])


def tarball_with_a_parent_member(tmp: Path) -> Case:
    evil = tarball(tmp / "FB-BEV.tar.gz", {"FB-BEV/README.md": b"hello\n", "../escaped.txt": b"gotcha\n"})
    (tmp / "upstream").mkdir()
    (tmp / "upstream" / "my-notes.txt").write_text("mine\n")
    return Case([UPSTREAM, "--upstream-dir", str(tmp / "upstream"), "materialize", "FB-BEV", "--src", str(evil)], 2,
                rf"^error: {evil}: refused: member '\.\./escaped\.txt' would be written outside the extraction "
                r"folder .*make one with `tar -C DIR -czf FILE.tar.gz .` from a clone or bare git dir$", [tmp])


def performance_run_without_a_step(tmp: Path) -> Case:
    """The launcher's rule for every training mode (BEVDepth performance on a training set smaller than one
    batch ended 'ok' with no step); the toy entry point exits 0 after 0 steps like Lightning does then."""
    (tmp / "data").mkdir()

    def check(proc):
        results = results_of(proc.stdout)
        assert results["status"] == "failed" and results["exit_code"] == 1 and results["steps"] == 0
        assert "without a single optimizer step" in results["failure"]
        assert any(re.match(r"^error: the run ended without a single optimizer step \(no records in .*"
                            r"steps.jsonl\): check that the training set holds at least one batch", line)
                   for line in lines(proc.stdout))
    return Case(toy_launch(tmp / "data", tmp / "runs", "--mode", "performance", extra=["--steps", "0"]), 1,
                None, [tmp / "data"], check=check)


CASES = {f.__name__: f for f in (work_dir_is_a_file, work_dir_inside_a_file, data_root_is_a_file,
                                 truncated_upstream_tarball, tarball_with_a_parent_member,
                                 performance_run_without_a_step)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line(name, tmp_path):
    case = CASES[name](tmp_path)
    before = snapshot(*case.watched)
    proc = subprocess.run([str(a) for a in case.argv], cwd=str(tmp_path), env=kit_env(**case.env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == case.code, proc.stdout[-3000:] + proc.stderr[-3000:]
    if case.error is not None:
        assert len(lines(proc.stderr)) == 1 and re.match(case.error, lines(proc.stderr)[0]), proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
    if case.check:
        case.check(proc)
    assert snapshot(*case.watched) == before


# ------------------------------------------------------------------------------------------ read-only work dir
def _read_only(folder: Path) -> List[str]:
    """Make ``folder`` read-only for the launcher: for a user, no write permission; for root (whom permissions do
    not bind), a read-only bind mount in a private mount namespace. Returns the command prefix to run under."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, str(folder), "true"], capture_output=True, text=True)
    assert probe.returncode == 0, f"running as root needs unshare -m and mount for this test: {probe.stderr}"
    return ["unshare", "-m", "sh", "-c", mount, str(folder)]


def test_read_only_work_dir(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    runs.mkdir()
    (runs / "earlier-run.txt").write_text("mine\n")
    prefix = _read_only(runs)
    before = snapshot(tmp_path)
    try:
        proc = subprocess.run(prefix + toy_launch(data, runs, "--mode", "performance"), cwd=str(tmp_path),
                              env=kit_env(), capture_output=True, text=True, timeout=120)
    finally:
        runs.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines(proc.stderr) == [f"error: --work-dir {runs} is not writable (a read-only file system, or no "
                                  f"permission for this user): pass a folder you can write to (each run gets a new "
                                  f"folder inside it)"]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------- wrong advice
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_cut_camera_image_is_refused_before_training(damage, root, nusc, bevdepth_checkout, tmp_path):
    """The launcher's data check on a real-layout root (no SYNTHETIC.json). A deleted image is not something a
    data preparation makes: the line names the file and says to restore it from the download. A cut one (its
    first half) used to pass the default check (24 files per kind) and crash training at step 2-3 with 'image
    file is truncated'; every image's end marker is checked now."""
    from bevkit.data.testing import hardlink_copy, replace_bytes, write_bevdepth_infos

    data = hardlink_copy(root, tmp_path / "nuscenes")
    (data / "SYNTHETIC.json").unlink()
    write_bevdepth_infos(data, nusc)
    image = sorted((data / "samples" / "CAM_FRONT").glob("*.jpg"))[3]
    rel = f"samples/CAM_FRONT/{image.name}"
    if damage == "missing":
        image.unlink()
        what = f"{image}: missing file referenced by"
        fix = f"fix: {rel} is missing from the dataset: restore it from your nuScenes download"
    else:
        replace_bytes(image, image.read_bytes()[:image.stat().st_size // 2])
        what = f"{image}: truncated image: {image.stat().st_size} bytes and no JPEG end-of-image marker"
        fix = f"fix: re-extract {rel} from the nuScenes download into {data}"
    before = snapshot(data)
    proc = subprocess.run([LAUNCH, "--model", "bevdepth", "--mode", "performance", "--device", "cpu", "--nproc", "1",
                           "--data-root", str(data), "--work-dir", str(tmp_path / "runs")],
                          env=kit_env(BEVKIT_UPSTREAM_DIR=bevdepth_checkout.parent), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    about = [line for line in lines(proc.stderr) if image.name in line]
    assert about and all(what in line and fix in line for line in about), proc.stderr
    assert not any("run the BEVDepth data preparation" in line for line in about)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(data) == before and not (tmp_path / "runs").exists()


def test_local_edit_in_upstream_advice_gives_a_patch_that_applies(fbbev_checkout, tmp_path):
    """The advice for a local edit in a checkout: its command saves only the user's change (a plain `git diff`
    also holds the kit patch, which then no longer applies); following the advice step by step brings the
    change back on a fresh kit-patched checkout."""
    up = tmp_path / "upstream"
    env = kit_env()
    subprocess.run([UPSTREAM, "--upstream-dir", str(up), "materialize", "FB-BEV", "--src", str(fbbev_checkout)],
                   env=env, check=True, capture_output=True, timeout=300)
    checkout = up / "FB-BEV"
    edited = checkout / "mmdet3d" / "__init__.py"  # a file the kit patch changes too
    edited.write_bytes(edited.read_bytes() + b"\n# my experiment\n")
    mine = edited.read_bytes()
    status = subprocess.run([UPSTREAM, "--upstream-dir", str(up), "status", "FB-BEV"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 1
    fix = next(line for line in status.stdout.splitlines() if line.strip().startswith("fix"))
    command = re.search(r"save them with `([^`]+)`", fix).group(1)
    assert command == f"tools/upstream --upstream-dir {up} diff FB-BEV > my.patch" and "git diff >" not in fix
    saved = subprocess.run(command.replace("tools/upstream", UPSTREAM, 1).split(" > ")[0].split(), env=env,
                           capture_output=True, timeout=120)
    assert saved.returncode == 0 and b"+# my experiment" in saved.stdout
    assert b"mmcv_maximum_version" not in saved.stdout  # the kit's own change to that file is not in it
    patch = tmp_path / "my.patch"
    patch.write_bytes(saved.stdout)
    # the rest of the advice: restore, rerun the setup of the checkout, apply
    subprocess.run(["git", "-C", str(checkout), "checkout", "--", "."], check=True)
    subprocess.run([UPSTREAM, "--upstream-dir", str(up), "materialize", "FB-BEV"], env=env, check=True,
                   capture_output=True, timeout=300)
    subprocess.run(["git", "-C", str(checkout), "apply", str(patch)], check=True)
    assert edited.read_bytes() == mine


# ----------------------------------------------------------------------------------------------- signals
def _fake_venv(folder: Path) -> Path:
    """A venv whose pip takes long and, like pip, prints a traceback into setup.sh's log when interrupted."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f"""#!/bin/bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  exec {sys.executable} -c '
import sys, time, traceback
print("Collecting setuptools<81", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    traceback.print_exc()
    print("ERROR: Operation cancelled by user", flush=True)
    sys.exit(1)'
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return folder


def _terminal_sigint() -> None:
    """SIGINT as a terminal's shell gives it. A test run started in the background by a non-interactive shell
    (`cmd &`) inherits SIGINT ignored, and bash can neither trap nor reset a signal ignored at its start."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_setup_sh_is_one_line_and_a_rerun_continues(tmp_path):
    venv = _fake_venv(tmp_path / "venv")
    before = snapshot(venv / "bin")
    env = kit_env()
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "setup.sh"), "--profile", "cpu", "--venv", str(venv),
                             "--no-upstream", "--models", "bevdepth"], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_terminal_sigint)
    log = venv / "bevkit-setup.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "Collecting" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert lines(err) == ["setup.sh: interrupted; nothing finished was lost: run the same command again to "
                          "continue where it stopped"]
    assert "Traceback" not in out + err and "last lines" not in err
    assert snapshot(venv / "bin") == before


def test_sigterm_is_recorded_as_143_and_run_files_follow_the_umask(tmp_path):
    """SIGTERM to the launcher: results.json says 143 (128 + 15, what a shell reports) and the launcher exits
    with it. The run folder's files, written by the launcher, the trainer and the timing hook alike, get the
    permissions of the user's umask (here 027: files 0640, folders 0750), none 0600 and none world-readable."""
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen(toy_launch(tmp_path / "data", tmp_path / "runs", "--mode", "performance",
                                       extra=["--sleep", "0.2"]),
                            env=kit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o027))
    deadline = time.monotonic() + 180
    steps = []
    while not any(p.read_text().strip() for p in steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
        steps = list((tmp_path / "runs").glob("*/steps.jsonl"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    results = results_of(out)
    assert results["exit_code"] == 143 and results["status"] == "failed"
    run_dir = steps[0].parent
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [run_dir] + list(run_dir.iterdir())}
    assert {"launch.json", "train.log", "steps.jsonl", "results.json"} <= set(modes)
    assert modes == {name: "0o750" if (run_dir.parent / name).is_dir() or name == run_dir.name else "0o640"
                     for name in modes}, modes


# ----------------------------------------------------------------------------------------- FB-OCC config
def test_a_data_root_with_a_comma_and_a_space_reaches_the_config_intact(fbbev_checkout, tmp_path, monkeypatch):
    """mmcv's --cfg-options parser splits 'data_root=/a,b/' into a list (then 'YapfError: invalid syntax') and
    drops spaces: the data root reaches the config through BEVKIT_DATA_ROOT instead, as the launcher sets it."""
    mmcv = pytest.importorskip("mmcv")
    from bevkit import launch
    from bevkit.models.fbocc.config import finalize

    data = tmp_path / "nu,scenes copy"
    data.mkdir()
    plan = launch.make_plan(launch.parse(["--model", "fbocc", "--mode", "full", "--device", "cpu", "--data-root",
                                          str(data), "--dry-run", "--no-data-check"]))
    entry = plan.argv[plan.argv.index("tools/train.py"):]
    parsed = mmcv.DictAction  # the parser tools/train.py uses for --cfg-options
    assert "--cfg-options" not in entry or not any("data_root" in a for a in entry)
    assert plan.env["BEVKIT_DATA_ROOT"] == str(data) and parsed is not None
    monkeypatch.setenv("FBBEV_ROOT", str(fbbev_checkout))
    monkeypatch.setenv("BEVKIT_DATA_ROOT", plan.env["BEVKIT_DATA_ROOT"])
    monkeypatch.setenv("BEVKIT_DEVICE", "cpu")
    cfg = mmcv.Config.fromfile(str(REPO_ROOT / "fbocc" / "configs" / "fbocc_r50_8p.py"))
    finalize(cfg)
    assert cfg.data_root == f"{data}/"
    assert cfg.data.train.ann_file == f"{data}/bevdetv2-nuscenes_infos_train.pkl"
    assert cfg.data.val.ann_file == f"{data}/bevdetv2-nuscenes_infos_val.pkl"
    cfg.pretty_text  # noqa: B018  (what tools/train.py logs: yapf must format it)


# ------------------------------------------------------------------------------------- the data loaders
def _relocated_copy(original: Path, copy: Path) -> Path:
    """A real copy of a prepared data root; then the original's images and lidar are damaged in place (other
    inodes than the copy's), so a read from the original fails instead of passing unnoticed."""
    shutil.copytree(original, copy)
    for p in list((original / "samples").rglob("*.jpg")) + list((original / "samples").rglob("*.pcd.bin")):
        p.unlink()
        p.write_bytes(b"\xff\xd8 damaged original")
    return copy


def _load(model: str, data: Path, indices, **env) -> dict:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "test" / "assets" / "dataset_item.py"), model, str(data),
                           *map(str, indices)], env=kit_env(**env), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.upstream
@pytest.mark.parametrize("model", ["fbocc", "bevdepth"])
def test_a_copied_data_root_reads_its_own_files_and_a_damaged_image_names_file_and_sample(
        model, root, nusc, fbbev_checkout, bevdepth_checkout, tmp_path):
    """Infos written for one root, the root copied: the copy passes the data check and its samples load through
    the upstream dataset from the copy (the original's files are damaged). Then an image in the copy is cut:
    loading that sample names the file and the sample token (upstream: 'image file is truncated', no name)."""
    from bevkit.data import validate
    from bevkit.data.testing import hardlink_copy, write_bevdepth_infos, write_fbocc_infos

    original = hardlink_copy(root, tmp_path / "original")
    (write_fbocc_infos if model == "fbocc" else write_bevdepth_infos)(original, nusc)
    copy = _relocated_copy(original, tmp_path / "copy")
    assert validate.validate(model, copy) == []
    env = dict(FBBEV_ROOT=fbbev_checkout) if model == "fbocc" else dict(BEVDEPTH_SRC=bevdepth_checkout)
    loaded = _load(model, copy, [0, 1, "--cut", "CAM_BACK"], **env)
    assert "items" in loaded and len(loaded["items"]) == 2, loaded
    token, image = loaded["items"][1]["token"], Path(loaded["cut"])
    assert image.parent.parent.parent == copy  # the copy's own file was loaded, then cut
    failed = loaded["after_cut"]
    assert failed.get("error") == "SampleFileError", failed
    assert failed["message"].startswith(f"damaged data file: {image}: OSError: image file is truncated")
    assert f"(sample {token})" in failed["message"] and "bevkit.data.validate" in failed["message"]
    problems = validate.validate(model, copy)  # and the default data check finds it first
    assert [p for p in problems if p.path == str(image) and "truncated image" in p.message]


def test_the_launcher_prints_the_damaged_file_line_of_a_failed_run(tmp_path):
    """A damaged-data error in a worker's traceback becomes the run's last error line."""
    (tmp_path / "data").mkdir()
    message = "damaged data file: /data/samples/CAM_BACK/x.jpg: OSError: image file is truncated (sample abc)"
    script = tmp_path / "fail.py"
    script.write_text(f"import sys\nprint('Traceback ...')\nprint('bevkit.data.decode.SampleFileError: {message}')\n"
                      "sys.exit(1)\n")
    spec = tmp_path / "spec.py"
    spec.write_text(f"from bevkit.registry import ModelSpec\nSPEC = ModelSpec(name='toy', display_name='Toy', "
                    f"upstream='', samples_per_device=1, build_entry=lambda r: [{str(script)!r}])\n")
    proc = subprocess.run([LAUNCH, "--spec", f"{spec}:SPEC", "--device", "cpu", "--nproc", "1", "--data-root",
                           str(tmp_path / "data"), "--work-dir", str(tmp_path / "runs"), "--mode", "eval"],
                          env=kit_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert f"error: {message}" in lines(proc.stdout)[-3:]


def test_a_checked_image_stays_lazy_and_names_the_file_when_decoding_fails(tmp_path):
    """The dataset modules' ``Image`` (runtime patches 'fbocc-image-decode-names-file', 'image_decode_names_file'):
    an opened image is not decoded yet (JPEG draft mode, BEVKIT_JPEG_DRAFT, needs that), and a cut JPEG fails
    when decoded, whenever that is, with the file's name (PIL: 'image file is truncated', no name)."""
    from PIL import Image

    from bevkit.data.decode import PREFIX, CheckedImage, SampleFileError

    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    Image.new("RGB", (320, 160), (90, 120, 200)).save(whole, quality=90)
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    checked = CheckedImage(Image)
    img = checked.open(str(whole))
    assert img.tile  # not decoded yet
    img.draft("RGB", (80, 40))
    assert img.convert("RGB").size == (80, 40)  # decoded at 1/4 scale
    with pytest.raises(SampleFileError, match="^" + re.escape(f"{PREFIX}{cut}: OSError: image file is truncated")):
        checked.open(str(cut)).convert("RGB")
    with pytest.raises(SampleFileError, match=re.escape(f"{PREFIX}{tmp_path / 'gone.jpg'}: FileNotFoundError")):
        checked.open(str(tmp_path / "gone.jpg"))
