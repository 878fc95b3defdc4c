"""FB-OCC data preparation: ``python -m bevkit.models.fbocc.prepare DATA_ROOT [options]``.

1. Info files: runs FB-BEV's own ``tools/create_data_bevdet.py`` logic (``nuscenes_data_prep`` then
   ``add_ann_adj_info``) on DATA_ROOT, writing DATA_ROOT/bevdetv2-nuscenes_infos_{train,val}.pkl. The
   upstream script hard-codes ``./data/nuscenes``; the first function takes the root as an argument, the
   second is run from a scratch folder whose ``data/nuscenes`` links to DATA_ROOT. The kit then rewrites the
   file paths inside the infos relative to DATA_ROOT (``samples/CAM_FRONT/...``), so a copied or moved data
   root reads its own files; the 'fbocc-infos-in-data-root' runtime patch joins them with the data root when
   training loads them.
2. Occ3D ground truth: DATA_ROOT/gts, or ``--occ3d DIR`` to link it there; every sample of the infos
   must have gts/<scene>/<token>/labels.npz.
3. Pretrained checkpoints (reference recipe only; ``--no-checkpoints`` for smoke runs): in CKPT_DIR
   (``--ckpt-dir``, else the kit's checkpoint folder: $BEVKIT_CKPT_DIR or DATA_ROOT/ckpts), verified by sha256
   (``SPEC.checkpoints``, :mod:`bevkit.checkpoints`).

Exit status 0 when everything needed is in place, 1 otherwise (with what to do).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from bevkit import checkpoints
from bevkit.fileio import atomic_write_bytes

INFO_PREFIX = "bevdetv2-nuscenes"
VERSION = "v1.0-trainval"
SPLITS = ("train", "val")

SUMS_FILE = checkpoints.SUMS_FILE


def info_path(data_root: Path, split: str) -> Path:
    return data_root / f"{INFO_PREFIX}_infos_{split}.pkl"


def info_path_fields(info: dict) -> Iterator[Tuple[dict, str]]:
    """(node, key) of every file path one FB-OCC info entry holds: lidar_path, each camera's and each sweep's
    data_path (what training opens)."""
    if "lidar_path" in info:
        yield info, "lidar_path"
    for node in list((info.get("cams") or {}).values()) + list(info.get("sweeps") or []):
        if isinstance(node, dict) and "data_path" in node:
            yield node, "data_path"


def relativize_infos(path: Path, data_root: Path) -> int:
    """Rewrite the absolute paths inside DATA_ROOT that an info file holds relative to DATA_ROOT (atomically);
    returns how many changed."""
    with open(path, "rb") as f:
        obj = pickle.load(f)
    prefix = str(data_root).rstrip("/") + "/"
    changed = 0
    for info in obj["infos"]:
        for node, key in info_path_fields(info):
            value = str(node[key])
            if value.startswith(prefix):
                node[key] = value[len(prefix):]
                changed += 1
    if changed:
        atomic_write_bytes(path, pickle.dumps(obj))
    return changed


def check_checkpoints(ckpt_dir: Path, record: bool = True) -> List[str]:
    """Problems with the reference recipe's pretrained checkpoints (``SPEC.checkpoints``) in ``ckpt_dir``
    (empty list when all are present and verified; see :mod:`bevkit.checkpoints`)."""
    from bevkit.models.fbocc import SPEC

    return checkpoints.check_folder([c for c, _ in SPEC.checkpoints], ckpt_dir, record=record,
                                    used_as={c.file: role for c, role in SPEC.checkpoints})


@contextlib.contextmanager
def _cwd_with_data_link(data_root: Path) -> Iterator[Path]:
    """A scratch working directory where ./data/nuscenes is DATA_ROOT (for upstream's hard-coded paths)."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fbocc-prep-") as tmp:
        (Path(tmp) / "data").mkdir()
        (Path(tmp) / "data" / "nuscenes").symlink_to(data_root, target_is_directory=True)
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(previous)


def create_infos(data_root: Path, fbbev_root: Path) -> List[Path]:
    """Run upstream tools/create_data_bevdet.py's two steps with DATA_ROOT instead of ./data/nuscenes."""
    from .runtime import activate

    activate(str(fbbev_root / "tools" / "create_data_bevdet.py"), device="cpu")
    import importlib

    module = importlib.import_module("tools.create_data_bevdet")
    # Both steps run from the scratch folder: upstream's converter strips os.getcwd() from file paths, so run
    # from an ancestor of DATA_ROOT (e.g. the kit's runs/) it would write paths relative to a folder that
    # training (which runs from the FB-BEV checkout) does not share.
    with _cwd_with_data_link(data_root):
        module.nuscenes_data_prep(root_path=str(data_root), info_prefix=INFO_PREFIX, version=VERSION,
                                  max_sweeps=0)
        module.add_ann_adj_info(INFO_PREFIX)
    written = [info_path(data_root, s) for s in SPLITS]
    for path in written:
        if path.is_file():
            relativize_infos(path, data_root)
    return written


def stale_infos(data_root: Path) -> List[str]:
    """Problems the data validator finds in existing info files (e.g. made for another data root, or with paths
    training cannot open); empty when they are usable."""
    from bevkit.data.validate import validate

    names = {str(info_path(data_root, s)) for s in SPLITS}
    return [f"{p.path}: {p.message}" for p in validate("fbocc", data_root) if p.path in names]


def set_aside_infos(data_root: Path) -> List[Path]:
    """Rename the existing info files to <name>.stale-<time> (never delete what the user has)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    kept = []
    for split in SPLITS:
        path = info_path(data_root, split)
        if path.is_file():
            target = path.with_name(f"{path.name}.stale-{stamp}")
            path.rename(target)
            kept.append(target)
    return kept


def check_occ3d(data_root: Path, occ3d: Optional[Path] = None) -> List[str]:
    """Link DATA_ROOT/gts to ``occ3d`` if asked, then check every sample of the infos has labels.npz."""
    gts = data_root / "gts"
    if occ3d is not None:
        occ3d = occ3d.resolve()
        if not (occ3d.is_dir()):
            return [f"--occ3d {occ3d} is not a directory (expected Occ3D-nuScenes gts/<scene>/<token>/labels.npz)"]
        if gts.is_symlink() or not gts.exists():
            if gts.is_symlink():
                gts.unlink()
            gts.symlink_to(occ3d, target_is_directory=True)
        elif gts.resolve() != occ3d:
            return [f"{gts} already exists and is not {occ3d}; move it away or drop --occ3d"]
    if not gts.is_dir():
        return [f"missing Occ3D ground truth {gts}: download Occ3D-nuScenes (gts.tar.gz) and extract it there, or "
                f"pass --occ3d DIR to link an existing copy"]
    problems = []
    for split in SPLITS:
        path = info_path(data_root, split)
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            infos = pickle.load(f)["infos"]
        missing = [i for i in infos if not (gts / i["scene_name"] / i["token"] / "labels.npz").is_file()]
        if missing:
            first = missing[0]
            problems.append(f"{len(missing)} of {len(infos)} {split} samples have no Occ3D labels, e.g. "
                            f"{gts / first['scene_name'] / first['token'] / 'labels.npz'}")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.models.fbocc.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", type=Path, help="nuScenes root (v1.0-trainval/, samples/, maps/, ...)")
    parser.add_argument("--fbbev", type=Path, default=None,
                        help="FB-BEV checkout (default: $FBBEV_ROOT or upstream/FB-BEV of the kit)")
    parser.add_argument("--occ3d", type=Path, default=None, help="Occ3D gts folder to link as DATA_ROOT/gts")
    parser.add_argument("--ckpt-dir", type=Path, default=None,
                        help="checkpoint folder (default $BEVKIT_CKPT_DIR, else DATA_ROOT/ckpts)")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="do not require the pretrained checkpoints (smoke runs use none)")
    parser.add_argument("--force", action="store_true", help="recreate the info files even if present")
    args = parser.parse_args(argv)

    data_root = args.data_root.resolve()
    if not (data_root / VERSION).is_dir():
        print(f"error: {data_root / VERSION} not found: DATA_ROOT must be a nuScenes root "
              f"(or make a synthetic one: python -m bevkit.data.synthetic --out DIR)", file=sys.stderr)
        return 1
    from .config import fbbev_root

    fbbev = (args.fbbev or fbbev_root()).resolve()
    if not (fbbev / "tools" / "create_data_bevdet.py").is_file():
        print(f"error: no FB-BEV checkout at {fbbev}: run setup.sh or pass --fbbev DIR", file=sys.stderr)
        return 1
    problems: List[str] = []
    present = all(info_path(data_root, s).is_file() for s in SPLITS)
    stale = stale_infos(data_root) if present and not args.force else []
    for line in stale:
        print(f"stale info file: {line}")
    if stale:
        for old in set_aside_infos(data_root):
            print(f"kept the old info file as {old}")
    if args.force or not present or stale:
        for path in create_infos(data_root, fbbev):
            print(f"wrote {path}")
    else:
        print(f"info files present in {data_root} (--force to recreate)")
    problems += check_occ3d(data_root, args.occ3d)
    if not args.no_checkpoints:
        folder = checkpoints.folder(data_root, explicit=args.ckpt_dir) or data_root / "ckpts"
        problems += check_checkpoints(folder.resolve())
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not problems:
        print(f"FB-OCC data ready in {data_root}")
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
