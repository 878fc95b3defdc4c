"""BEVDepth data preparation for a nuScenes data root (real or synthetic):

    python -m bevkit.models.bevdepth.prepare DATA_ROOT [--workers N] [--force] [--skip-depth]

1. ``nuscenes_infos_{train,val}.pkl`` (and ``_test`` when ``v1.0-test`` exists) with upstream's own
   ``scripts/gen_info.py:generate_info`` (upstream's ``main`` hard-codes ./data/nuScenes);
2. ``depth_gt/`` for the train split with :mod:`bevkit.data.depth_gt`.

Existing files are kept unless ``--force`` (resumable).
"""
from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Optional, Sequence

from bevkit.fileio import atomic_write_bytes


def _gen_info_module():
    from .runtime import ensure_upstream_importable

    checkout = ensure_upstream_importable()
    path = checkout / "scripts" / "gen_info.py"
    spec = importlib.util.spec_from_file_location("bevdepth_gen_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dump(obj, path: Path) -> None:
    atomic_write_bytes(path, pickle.dumps(obj))


def make_infos(data_root: Path, force: bool = False) -> None:
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils import splits

    wanted = [("train", "v1.0-trainval", splits.train), ("val", "v1.0-trainval", splits.val)]
    if (data_root / "v1.0-test").is_dir():
        wanted.append(("test", "v1.0-test", splits.test))
    todo = [w for w in wanted if force or not (data_root / f"nuscenes_infos_{w[0]}.pkl").is_file()]
    if not todo:
        print(f"infos: {', '.join(f'nuscenes_infos_{w[0]}.pkl' for w in wanted)} already in {data_root}")
        return
    gen_info = _gen_info_module()
    cache = {}
    for split, version, scenes in todo:
        if version not in cache:
            cache[version] = NuScenes(version=version, dataroot=str(data_root), verbose=False)
        infos = gen_info.generate_info(cache[version], scenes)
        _dump(infos, data_root / f"nuscenes_infos_{split}.pkl")
        print(f"infos: nuscenes_infos_{split}.pkl ({len(infos)} samples)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.models.bevdepth.prepare",
                                     description="BEVDepth infos + precomputed depth ground truth")
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--workers", type=int, default=None, help="depth GT processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="regenerate existing files")
    parser.add_argument("--skip-depth", action="store_true", help="only the info pkls")
    args = parser.parse_args(argv)
    data_root = args.data_root.resolve()
    if not (data_root / "v1.0-trainval").is_dir():
        print(f"error: {data_root} has no v1.0-trainval/ (a nuScenes data root is needed; a synthetic one is "
              f"made with 'python -m bevkit.data.synthetic --out DIR')", file=sys.stderr)
        return 1
    make_infos(data_root, args.force)
    if not args.skip_depth:
        from bevkit.data import depth_gt

        return depth_gt.main([str(data_root)] + (["--workers", str(args.workers)] if args.workers else [])
                             + (["--force"] if args.force else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
