"""Precompute BEVDepth's depth ground truth offline: one file per camera image.

    python -m bevkit.data.depth_gt DATA_ROOT [--workers N] [--splits train] [--force]

Upstream BEVDepth projects each keyframe's LIDAR_TOP cloud into the six cameras inside the data loader,
for every sample of every epoch. This tool does it once, in parallel (one task per keyframe), and
writes ``DATA_ROOT/depth_gt/<image basename>.bin``: float32 rows (u, v, depth) in original image pixels,
points with depth > 0 strictly inside a 1-pixel border (the DrivingSDK port's format; the same numbers
upstream's ``get_lidar_depth`` returns). The ``depth_gt_precomputed`` runtime patch reads them.

Resumable: files are written atomically (temporary name, then rename), so an existing file is complete
and is skipped unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from bevkit.fileio import atomic_write_bytes

DEPTH_GT_DIR = "depth_gt"
CAMS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")


def output_path(data_root, image_filename: str) -> Path:
    return Path(data_root) / DEPTH_GT_DIR / (os.path.basename(image_filename) + ".bin")


def _rotation(quaternion_wxyz) -> np.ndarray:
    from pyquaternion import Quaternion

    return Quaternion(quaternion_wxyz).rotation_matrix


def _rotate(points: np.ndarray, rot: np.ndarray) -> np.ndarray:
    # float64 product stored as float32, like nuscenes-devkit's PointCloud.rotate on a float32 cloud
    return (rot @ points.astype(np.float64)).astype(np.float32)


def _translate(points: np.ndarray, offset) -> np.ndarray:
    return points + np.asarray(offset, dtype=np.float32)[:, None]


def project_lidar(points: np.ndarray, lidar_info: Dict, cam_info: Dict,
                  image_size: Tuple[int, int]) -> np.ndarray:
    """Lidar points [N, >=3] (sensor frame) -> float32 [M, 3] (u, v, depth) in image pixels.

    Chain: lidar -> ego (lidar time) -> global -> ego (camera time) -> camera -> pixels; keeps
    depth > 0 and 1 < u < W - 1, 1 < v < H - 1 (upstream BEVDepth's ``map_pointcloud_to_image``).
    """
    width, height = image_size
    pts = np.ascontiguousarray(points[:, :3].T, dtype=np.float32)
    lidar_cs, lidar_ego = lidar_info["calibrated_sensor"], lidar_info["ego_pose"]
    cam_cs, cam_ego = cam_info["calibrated_sensor"], cam_info["ego_pose"]
    pts = _translate(_rotate(pts, _rotation(lidar_cs["rotation"])), lidar_cs["translation"])
    pts = _translate(_rotate(pts, _rotation(lidar_ego["rotation"])), lidar_ego["translation"])
    pts = _rotate(_translate(pts, -np.asarray(cam_ego["translation"])), _rotation(cam_ego["rotation"]).T)
    pts = _rotate(_translate(pts, -np.asarray(cam_cs["translation"])), _rotation(cam_cs["rotation"]).T)
    depth = pts[2]
    pixels = np.asarray(cam_cs["camera_intrinsic"], dtype=np.float64) @ pts.astype(np.float64)
    pixels = pixels[:2] / pixels[2:3]
    keep = ((depth > 0) & (pixels[0] > 1) & (pixels[0] < width - 1)
            & (pixels[1] > 1) & (pixels[1] < height - 1))
    return np.concatenate([pixels[:, keep].T, depth[keep, None]], axis=1).astype(np.float32)


def write_atomic(path: Path, data: np.ndarray) -> None:
    atomic_write_bytes(path, np.ascontiguousarray(data, dtype=np.float32).tobytes())


def _image_size(data_root: str, cam: Dict) -> Tuple[int, int]:
    if cam.get("width") and cam.get("height"):
        return int(cam["width"]), int(cam["height"])
    from PIL import Image

    with Image.open(os.path.join(data_root, cam["filename"])) as img:  # reads the header only
        return img.size


def process_sample(task: Tuple[str, Dict, bool]) -> Tuple[int, int]:
    """One keyframe: (files written, files skipped)."""
    data_root, info, force = task
    cams = [c for c in CAMS if c in info["cam_infos"]]
    todo = [c for c in cams if force or not output_path(data_root, info["cam_infos"][c]["filename"]).is_file()]
    if not todo:
        return 0, len(cams)
    lidar = info["lidar_infos"]["LIDAR_TOP"]
    lidar_path = os.path.join(data_root, lidar["filename"])
    if not os.path.isfile(lidar_path):
        raise FileNotFoundError(f"lidar file {lidar_path} (sample {info.get('sample_token')}) is missing")
    points = np.fromfile(lidar_path, dtype=np.float32).reshape(-1, 5)[:, :4]
    for cam in todo:
        cam_info = info["cam_infos"][cam]
        uvd = project_lidar(points, lidar, cam_info, _image_size(data_root, cam_info))
        write_atomic(output_path(data_root, cam_info["filename"]), uvd)
    return len(todo), len(cams) - len(todo)


def load_infos(data_root, splits: Sequence[str]) -> List[Dict]:
    infos: List[Dict] = []
    for split in splits:
        path = Path(data_root) / f"nuscenes_infos_{split}.pkl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: generate the BEVDepth infos first "
                                    f"(python scripts/gen_info.py in the BEVDepth checkout, see bevdepth/README.md)")
        with open(path, "rb") as fh:
            data = pickle.load(fh)
        infos.extend(data["infos"] if isinstance(data, dict) else data)
    return infos


def generate(data_root, splits: Sequence[str] = ("train",), workers: Optional[int] = None,
             force: bool = False, progress: bool = True) -> Dict[str, int]:
    """Write every missing depth_gt file for the given splits; returns counts."""
    from tqdm import tqdm

    data_root = str(Path(data_root).resolve())
    infos = load_infos(data_root, splits)
    workers = workers or os.cpu_count() or 1
    tasks = [(data_root, info, force) for info in infos]
    written = skipped = 0
    bar = tqdm(total=len(tasks), desc="depth_gt", unit="sample", disable=not progress)
    if workers == 1:
        results: Iterable = map(process_sample, tasks)
        pool = None
    else:
        pool = Pool(workers)
        results = pool.imap_unordered(process_sample, tasks, chunksize=4)
    try:
        for done, skip in results:
            written += done
            skipped += skip
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return {"samples": len(tasks), "written": written, "skipped": skipped}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.data.depth_gt", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", help="nuScenes data root holding nuscenes_infos_<split>.pkl")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--splits", nargs="+", default=["train"],
                        help="info splits to cover (default: train; evaluation needs no depth)")
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args(argv)
    try:
        counts = generate(args.data_root, args.splits, args.workers, args.force)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"depth_gt: {counts['written']} files written, {counts['skipped']} already there "
          f"({counts['samples']} samples) in {Path(args.data_root) / DEPTH_GT_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
