"""``python -m bevkit.doctor``: is this machine ready to run the kit? One row per check, one fix per problem.

Checks Python and torch against the profile's pins, which accelerators torch can use (NPU via torch_npu,
CUDA, CPU), whether torch_npu / mx_driving / CANN are present and consistent with each other, that
mmcv-full carries its compiled ops, the upstream checkouts (commit and kit patches), and, given
``--data-root``, the data layout (``bevkit.data.validate``). Exit status 1 when anything is wrong.

Importing this module does not import torch (setup.sh uses ``--torch-npu-pin`` before torch exists).
"""
from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bevkit import REPO_ROOT, device
from bevkit.registry import MODELS
from bevkit.provenance import cann_home, cann_version, dist_version

REQ_DIR = REPO_ROOT / "configs" / "requirements"
MODEL_NAMES = tuple(MODELS)
OK, PROBLEM, WARN, NA = "ok", "PROBLEM", "warn", "-"
#: Python of the reference stack per profile (anything >= 3.8 may work; other versions only warn).
REFERENCE_PYTHON = {"npu": "3.8", "cuda": "3.11", "cpu": "3.11"}
CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"


@dataclass
class Check:
    name: str
    status: str      # OK / PROBLEM / WARN / NA
    detail: str
    fix: str = ""


# ------------------------------------------------------------------------------------ pins and versions

def _marker_ok(marker: str) -> bool:
    if not marker:
        return True
    try:
        from packaging.markers import Marker
    except ImportError:  # without packaging, only unmarked pins are trusted
        return False
    return Marker(marker).evaluate()


def pins(filename: str) -> Dict[str, str]:
    """``name -> version`` for the ``name==version`` lines of a requirements file that apply here."""
    path = REQ_DIR / filename
    out: Dict[str, str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        req, _, marker = line.partition(";")
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^\s,]+)$", req.strip())
        if m and _marker_ok(marker.strip()):
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def _base(version: str) -> str:
    return version.split("+", 1)[0]


# ------------------------------------------------------------------------------------------------ CANN

def _npu_profile_torch() -> Optional[str]:
    """The torch version npu.txt installs (its lines differ only by platform markers), or None."""
    found = {_base(m.group(1)) for m in re.finditer(r"(?m)^\s*torch\s*==\s*([^\s;,#]+)",
                                                    (REQ_DIR / "npu.txt").read_text())}
    return found.pop() if len(found) == 1 else None


def npu_matrix(torch_version: Optional[str] = None) -> List[Tuple[str, str]]:
    """[(CANN version, torch_npu build)] from configs/requirements/npu-cann.tsv for ``torch_version`` (default:
    the npu profile's torch from npu.txt), default first. Columns are tab-separated: cann, torch_npu, torch, ...
    (the others document the row and its sources)."""
    want = _base(torch_version) if torch_version else _npu_profile_torch()
    rows = []
    for raw in (REQ_DIR / "npu-cann.tsv").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
            row_torch = fields[2] if len(fields) > 2 else None
            if row_torch is None or want is None or row_torch == want:
                rows.append((fields[0], fields[1]))
    return rows


def torch_npu_for(cann: Optional[str]) -> Tuple[str, Optional[str]]:
    """(torch_npu build, the CANN row it was chosen for, or None when CANN's version is unknown)."""
    rows = npu_matrix()
    if cann:
        for row_cann, npu in rows:
            if cann == row_cann or cann.startswith(row_cann + "."):
                return npu, row_cann
    return rows[0][1], None


# ---------------------------------------------------------------------------------------------- checks

def check_python(profile: str) -> Check:
    version = platform.python_version()
    ref = REFERENCE_PYTHON[profile]
    if sys.version_info < (3, 8):
        return Check("python", PROBLEM, f"{version} ({sys.executable})", "use Python 3.8 or newer (setup.sh --python)")
    if not version.startswith(ref + "."):
        return Check("python", WARN, f"{version}; the {profile} reference stack uses {ref}")
    return Check("python", OK, f"{version} ({sys.executable})")


def check_torch(profile: str):
    """(Check, torch module or None)."""
    want = pins(f"{profile}.txt").get("torch")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch_npu makes `import torch` raise RuntimeError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fix = "rerun bash setup.sh"
        if "torch_npu" in msg or "backend extension" in msg:
            fix = ("torch_npu is installed but cannot load CANN: source the CANN set_env.sh, "
                   "or on a machine without NPUs `pip uninstall -y torch_npu mx_driving`")
        return Check("torch", PROBLEM, f"import torch failed: {msg}", fix), None
    have = torch.__version__
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    if want and _base(have) != _base(want):
        return Check("torch", PROBLEM, f"{have} ({build}); {profile} pins {want}",
                     f"rerun bash setup.sh --profile {profile} (or use the venv it made)"), torch
    if profile == "cpu" and torch.version.cuda:
        return Check("torch", PROBLEM, f"{have} ({build}) on the cpu profile",
                     "pip uninstall -y torch, then rerun setup.sh with "
                     "BEVKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu"), torch
    return Check("torch", OK, f"{have} ({build})"), torch


def check_accelerators(profile: str, torch) -> Check:
    if torch is None:
        return Check("accelerators", PROBLEM, "unknown: torch does not import", "fix torch first (row above)")
    found = device.available_devices()
    parts = []
    for kind in found:
        if kind == "npu":
            parts.append(f"npu x{torch.npu.device_count()}")  # type: ignore[attr-defined]
        elif kind == "cuda":
            parts.append(f"cuda x{torch.cuda.device_count()}")
        else:
            parts.append("cpu")
    detail = "usable: " + ", ".join(parts) + (" (CPU only)" if found == ["cpu"] else "")
    if profile == "npu" and "npu" not in found:
        return Check("accelerators", PROBLEM, detail,
                     "torch_npu sees no NPU: check `npu-smi info`, the driver, and that CANN's set_env.sh is sourced")
    if profile == "cuda" and "cuda" not in found:
        return Check("accelerators", PROBLEM, detail,
                     "torch sees no GPU: check `nvidia-smi` and that torch is a CUDA build")
    return Check("accelerators", OK, detail)


def check_cann(profile: str, environ: Optional[dict] = None) -> Check:
    home = cann_home(environ)
    if profile != "npu":
        return Check("CANN", NA if home is None else OK,
                     f"not needed on {profile}" if home is None else f"{home} ({cann_version(environ) or '?'})")
    if home is None:
        return Check("CANN", PROBLEM, "no CANN toolkit in the environment (ASCEND_TOOLKIT_HOME unset)",
                     f"source {CANN_SET_ENV} (or `. .venv/bin/activate`, which sources it)")
    version = cann_version(environ)
    known = [c for c, _ in npu_matrix()]
    if version is None:
        return Check("CANN", WARN, f"{home} (version unknown)")
    if not any(version == c or version.startswith(c + ".") for c in known):
        return Check("CANN", WARN, f"{version} at {home}; the kit is tested with {', '.join(known)}")
    return Check("CANN", OK, f"{version} at {home}")


def check_torch_npu(profile: str, torch_version: Optional[str], environ: Optional[dict] = None) -> Check:
    have = dist_version("torch-npu", "torch_npu")
    if profile != "npu":
        if have:
            return Check("torch_npu", PROBLEM, f"{have} installed on a {profile} machine",
                         "pip uninstall -y torch_npu mx_driving (without CANN they break `import torch`)")
        return Check("torch_npu", NA, f"not used on {profile}")
    if not have:
        return Check("torch_npu", PROBLEM, "not installed", "rerun bash setup.sh --profile npu")
    problems = []
    if torch_version and _base(have).split(".post")[0] != _base(torch_version):
        problems.append(f"built for torch {_base(have).split('.post')[0]}, torch is {torch_version}")
    cann = cann_version(environ)
    want, row = torch_npu_for(cann)
    if row is not None and have != want:
        problems.append(f"CANN {cann} needs torch_npu {want}")
    if problems:
        return Check("torch_npu", PROBLEM, f"{have}: " + "; ".join(problems),
                     f"pip install torch-npu=={want} -c configs/requirements/npu.txt (or rerun setup.sh)")
    return Check("torch_npu", OK, have + (f" (matches CANN {cann})" if row else ""))


def check_mx_driving(profile: str, torch_version: Optional[str]) -> Check:
    have = dist_version("mx-driving", "mx_driving")
    if profile != "npu":
        if have:
            return Check("mx_driving", WARN, f"{have} installed but only usable on npu")
        return Check("mx_driving", NA, f"not used on {profile} (bevkit.ops uses its portable/cuda paths)")
    want = pins("npu-accel.txt").get("mx-driving")
    if not have:
        return Check("mx_driving", PROBLEM, "not installed",
                     f"pip install mx-driving=={want}" if want else
                     "build DrivingSDK at the branch npu-cann.tsv names for your CANN (see npu-accel.txt)")
    detail = have
    try:
        from importlib import metadata

        from packaging.requirements import Requirement

        for spec in metadata.requires("mx-driving") or []:
            req = Requirement(spec)
            if req.name == "torch" and torch_version and _base(torch_version) not in req.specifier:
                return Check("mx_driving", PROBLEM, f"{have} needs torch{req.specifier}, torch is {torch_version}",
                             f"pip install mx-driving=={want} (the kit's pin for torch 2.1)")
    except Exception:  # noqa: BLE001 - metadata or packaging missing: version check only
        pass
    if want and have != want:
        return Check("mx_driving", WARN, f"{detail}; the kit pins {want}")
    return Check("mx_driving", OK, detail)


def check_mmcv(profile: str, torch) -> Check:
    have = dist_version("mmcv-full")
    want = "1.7.2"
    fix = f"rerun bash setup.sh (builds mmcv-full {want} with MMCV_WITH_OPS=1 for {profile})"
    if not have:
        return Check("mmcv ops", PROBLEM, "mmcv-full not installed", fix)
    if have != want:
        return Check("mmcv ops", PROBLEM, f"mmcv-full {have}, the kit needs {want}",
                     f"pip uninstall -y mmcv-full, then {fix}")
    if torch is None:
        return Check("mmcv ops", PROBLEM, f"mmcv-full {have}, ops not checked (torch does not import)",
                     "fix torch first (row above)")
    try:
        import warnings

        with warnings.catch_warnings():  # mmcv 1.x warns about its 2.0 renaming on every import
            warnings.simplefilter("ignore")
            importlib.import_module("mmcv._ext")
    except Exception as exc:  # noqa: BLE001
        return Check("mmcv ops", PROBLEM, f"mmcv-full {have} without loadable ops: {str(exc).splitlines()[0]}",
                     f"pip uninstall -y mmcv-full, then {fix}")
    return Check("mmcv ops", OK, f"mmcv-full {have}, compiled ops load (mmcv._ext)")


def check_packages(profile: str) -> List[Check]:
    want = pins("common.txt")
    rows = []
    for dist, label in (("numpy", "numpy"), ("mmdet", "mmdet"), ("mmsegmentation", "mmseg")):
        have = dist_version(dist)
        pin = want.get(dist)
        if not have:
            rows.append(Check(label, PROBLEM, "not installed", "rerun bash setup.sh"))
        elif pin and have != pin:
            rows.append(Check(label, PROBLEM, f"{have}; the kit pins {pin}",
                              f"pip install {dist}=={pin} -c configs/requirements/common.txt"))
        else:
            rows.append(Check(label, OK, have))
    return rows


def check_upstreams(models: Sequence[str], root: Optional[Path]) -> List[Check]:
    from . import upstream

    rows = []
    for model in models:
        up = upstream.get(model)
        st = upstream.status(up, upstream.checkout_dir(up, root))
        applied = sum(1 for _, state in st.patches if state == "applied")
        detail = f"{st.path} @ {(st.commit or '-')[:12]}, patches {applied}/{len(st.patches)} applied"
        if st.ok:
            rows.append(Check(f"upstream {up.name}", OK, detail))
        for msg, fix in st.problems:
            rows.append(Check(f"upstream {up.name}", PROBLEM, msg, fix))
    return rows


def check_data(models: Sequence[str], data_root: Path, full: bool = False) -> List[Check]:
    try:  # the validator needs numpy and the nuscenes-devkit: a broken install is a problem row, not a crash
        validate = importlib.import_module("bevkit.data.validate")
    except ImportError as exc:
        return [Check("data", PROBLEM, f"cannot check {data_root}: the data validator is not available ({exc})",
                      "rerun bash setup.sh (it installs numpy and the nuscenes-devkit the validator needs)")]
    rows = []
    for model in models:
        problems = validate.validate(model, Path(data_root), full=full)
        if not problems:
            rows.append(Check(f"data {model}", OK, f"{data_root} complete{' (full check)' if full else ''}"))
        for p in problems:
            rows.append(Check(f"data {model}", PROBLEM, f"{p.path}: {p.message}", p.fix))
    return rows


def run_checks(profile: str, models: Sequence[str] = MODEL_NAMES, upstream_dir: Optional[Path] = None,
               data_root: Optional[Path] = None, full: bool = False, upstreams: bool = True) -> List[Check]:
    rows = [check_python(profile)]
    torch_row, torch = check_torch(profile)
    rows.append(torch_row)
    torch_version = torch.__version__ if torch is not None else dist_version("torch")
    rows.append(check_accelerators(profile, torch))
    rows.append(check_cann(profile))
    rows.append(check_torch_npu(profile, torch_version))
    rows.append(check_mx_driving(profile, torch_version))
    rows.append(check_mmcv(profile, torch))
    rows += check_packages(profile)
    if upstreams:
        rows += check_upstreams(models, upstream_dir)
    if data_root is not None:
        rows += check_data(models, data_root, full)
    return rows


def render(rows: Sequence[Check], profile: str) -> str:
    w1 = max([len("check")] + [len(r.name) for r in rows])
    w2 = max([len("status")] + [len(r.status) for r in rows])
    lines = [f"bevkit doctor (profile {profile})", f"{'check':<{w1}}  {'status':<{w2}}  detail",
             f"{'-' * w1}  {'-' * w2}  {'-' * 6}"]
    lines += [f"{r.name:<{w1}}  {r.status:<{w2}}  {r.detail}" for r in rows]
    problems = [r for r in rows if r.status == PROBLEM]
    if problems:
        lines += ["", f"{len(problems)} problem(s); to fix:"]
        lines += [f"- {r.name}: {r.fix}" for r in problems]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)


def default_models() -> str:
    """The models setup.sh set up in the running venv (its record), else all."""
    record = Path(sys.prefix) / ".bevkit-stamps" / "models"
    if record.is_file():
        models = [m for m in record.read_text().strip().split(",") if m in MODEL_NAMES]
        if models:
            return ",".join(models)
    return ",".join(MODEL_NAMES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=device.DEVICES, default=None,
                        help="profile to check against (default: detected, as setup.sh does)")
    parser.add_argument("--models", default=None,
                        help="comma-separated: fbocc,bevdepth (default: those setup.sh set up in this venv)")
    parser.add_argument("--data-root", type=Path, default=None, help="also check this data folder's layout")
    parser.add_argument("--full", action="store_true", help="with --data-root: check every file, not a sample")
    parser.add_argument("--upstream-dir", type=Path, default=None,
                        help="folder holding the upstream checkouts (default: $BEVKIT_UPSTREAM_DIR or upstream/)")
    parser.add_argument("--no-upstream", action="store_true", help="skip the upstream checks (environment only)")
    parser.add_argument("--torch-npu-pin", action="store_true", help=argparse.SUPPRESS)  # used by setup.sh
    args = parser.parse_args(argv)
    if args.torch_npu_pin:
        cann = cann_version()
        pin, row = torch_npu_for(cann)
        if row is None:
            print(f"bevkit.doctor: CANN version {'unknown' if cann is None else cann + ' not in npu-cann.tsv'}; "
                  f"using torch_npu {pin}", file=sys.stderr)
        print(pin)
        return 0
    models = [m for m in (args.models or default_models()).split(",") if m]
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad:
        parser.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODEL_NAMES)}")
    profile = args.profile or device.detect_profile()
    rows = run_checks(profile, models, args.upstream_dir, args.data_root, args.full, not args.no_upstream)
    print(render(rows, profile))
    return 1 if any(r.status == PROBLEM for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
