"""Pictures of predictions: what evaluation dumps for a few samples, and the PNGs drawn from it.

    tools/visualize RUN_DIR [--samples N] [--out DIR] [--score-threshold T]

During evaluation, a runtime patch of each model (FB-OCC: ``fbocc-prediction-samples``; BEVDepth:
``prediction_samples``) hands the real evaluation's output for a few samples to :class:`Dumper`, which writes
``RUN_DIR/predictions/<sample token>.npz`` on global rank 0 (``BEVKIT_PREDICTION_SAMPLES`` of them, default
:data:`DEFAULT_DUMPED`; each file holds what its pictures need: predictions, ground truth, camera projections,
image paths). After every run the launcher draws :data:`DEFAULT_SAMPLES` of them into ``RUN_DIR/pictures/``
(:func:`after_run`); ``tools/visualize`` draws more. The drawing is the model's (``ModelSpec.pictures``:
a module with ``render(sample, out_dir, options) -> [png paths]``); the geometry both share is here.

Frames: "ego" is the frame the model predicts in; ``ego2img`` (4x4, one per camera) maps ego points to pixels
of the original image (intrinsics x sensor <- ego, through the global frame when the camera's ego pose differs).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bevkit import env, log

PICTURES_DIR = "pictures"
PREDICTIONS_DIR = "predictions"
#: samples the launcher draws after a run; tools/visualize draws more
DEFAULT_SAMPLES = 2
#: samples evaluation dumps unless BEVKIT_PREDICTION_SAMPLES says otherwise
DEFAULT_DUMPED = 6

#: one colour per class name (RGB 0-255), chosen apart; the Occ3D classes include the detection classes
CLASS_COLOURS = {
    "others": (80, 80, 80), "barrier": (255, 120, 50), "bicycle": (255, 105, 180), "bus": (255, 215, 0),
    "car": (0, 150, 245), "construction_vehicle": (0, 205, 205), "motorcycle": (200, 180, 0),
    "pedestrian": (230, 0, 0), "traffic_cone": (255, 240, 150), "trailer": (135, 60, 0), "truck": (160, 32, 240),
    "driveable_surface": (255, 0, 255), "other_flat": (139, 137, 137), "sidewalk": (75, 0, 75),
    "terrain": (150, 240, 80), "manmade": (222, 184, 135), "vegetation": (0, 175, 0),
}

#: the 12 edges of a box given by :func:`box_corners` (bottom 0-3, top 4-7)
BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


# ----------------------------------------------------------------------------------------------- dumping
def dump_count() -> int:
    """How many samples evaluation dumps (BEVKIT_PREDICTION_SAMPLES; 0 turns the pictures off)."""
    value = env.get_int("BEVKIT_PREDICTION_SAMPLES")
    return DEFAULT_DUMPED if value is None else max(0, value)


class Dumper:
    """Writes predictions/<token>.npz for the first :func:`dump_count` samples a process hands it, on global
    rank 0 of a launcher run only (BEVKIT_RUN_DIR set)."""

    def __init__(self):
        self.written = 0

    def restart(self) -> None:
        """A new evaluation pass: its samples replace the previous pass's (the last evaluation's stay)."""
        self.written = 0

    def folder(self) -> Optional[Path]:
        run_dir = env.get("BEVKIT_RUN_DIR")
        if not run_dir or int(os.environ.get("RANK", "0") or 0) != 0:
            return None
        return Path(run_dir) / PREDICTIONS_DIR

    def wanted(self) -> int:
        """How many more samples to dump (0 when this process dumps none)."""
        return max(0, dump_count() - self.written) if self.folder() is not None else 0

    def save(self, token: str, arrays: Dict[str, Any]) -> Optional[Path]:
        import numpy as np

        folder = self.folder()
        if folder is None or not self.wanted():
            return None
        folder.mkdir(parents=True, exist_ok=True)
        tmp = str(folder / f".{token}.{os.getpid()}.npz")  # written whole, then renamed: readers never see a part
        try:
            np.savez_compressed(tmp, token=np.array(token), **arrays)
            path = folder / f"{token}.npz"
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.written += 1
        return path


def guarded(what: str, fn, *args, **kwargs):
    """Run a dump step; a failure is logged, never raised (pictures must not break an evaluation)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, the evaluation goes on
        log.get("pictures").warning(f"{what} failed, no pictures of predictions: {type(e).__name__}: {e}")
        return None


# ---------------------------------------------------------------------------------------------- geometry
def quaternion_matrix(q: Sequence[float]):
    """3x3 rotation of a unit quaternion (w, x, y, z), as nuScenes stores them."""
    import numpy as np

    w, x, y, z = (float(v) for v in q)
    n = w * w + x * x + y * y + z * z
    s = 2.0 / n if n else 0.0
    return np.array([[1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
                     [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
                     [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)]])


def pose(rotation: Sequence[float], translation: Sequence[float]):
    """4x4 transform of a nuScenes (quaternion, translation) pose."""
    import numpy as np

    m = np.eye(4)
    m[:3, :3] = quaternion_matrix(rotation)
    m[:3, 3] = np.asarray(translation, dtype=float)
    return m


def ego_to_image(intrinsic, sensor2ego, camego2global, ego2global):
    """4x4 ego -> pixel (u*z, v*z, z): intrinsics x (sensor <- camera's ego <- global <- ego)."""
    import numpy as np

    k = np.eye(4)
    k[:3, :3] = np.asarray(intrinsic, dtype=float)
    return k @ np.linalg.inv(sensor2ego) @ np.linalg.inv(camego2global) @ ego2global


def project(points, ego2img):
    """(N, 3) ego points -> ((N, 2) pixels, (N,) depth along the optical axis)."""
    import numpy as np

    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(ego2img).T
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = p[:, :2] / z[:, None]
    return uv, z


def focal_length(ego2img) -> float:
    """The horizontal focal length (pixels) inside an ego -> pixel matrix K @ [R | t]: row 0 of its 3x3 part is
    fx * R0 + cx * R2 and row 2 is R2 (unit, orthogonal to R0)."""
    import numpy as np

    m = np.asarray(ego2img, dtype=float)
    row0, row2 = m[0, :3], m[2, :3]
    return float(np.linalg.norm(row0 - (row0 @ row2) * row2))


def box_corners(boxes):
    """(N, >=7) boxes (x, y, z centre, dx length, dy width, dz height, yaw) -> (N, 8, 3) corners."""
    import numpy as np

    boxes = np.asarray(boxes, dtype=float)
    if boxes.size == 0:
        return np.zeros((0, 8, 3))
    unit = np.array([[1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 1, -1],
                     [1, 1, 1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1]], dtype=float) / 2
    local = unit[None] * boxes[:, None, 3:6]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (N, 2, 2)
    xy = np.einsum("nij,nkj->nki", rot, local[..., :2])
    return np.concatenate([xy, local[..., 2:]], -1) + boxes[:, None, :3]


def image_path(recorded: str, data_root: Optional[str]) -> Optional[Path]:
    """An image path as the info files hold it: absolute, or below the data root (from 'samples/' on)."""
    path = Path(recorded)
    if path.is_file():
        return path
    if data_root:
        parts = path.parts
        tail = Path(*parts[parts.index("samples"):]) if "samples" in parts else path
        candidate = Path(data_root) / tail
        if candidate.is_file():
            return candidate
    return None


def read_image(recorded: str, data_root: Optional[str]):
    """The image as an (H, W, 3) array, or None when it is not on this machine."""
    import numpy as np
    from PIL import Image

    path = image_path(recorded, data_root)
    return np.asarray(Image.open(path).convert("RGB")) if path is not None else None


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ drawing
def prediction_files(run_dir: Path) -> List[Path]:
    """The dumped samples of a run, in dataset order."""
    import numpy as np

    files = sorted((Path(run_dir) / PREDICTIONS_DIR).glob("*.npz"))

    def order(path: Path) -> Tuple[int, str]:
        with np.load(path) as data:
            return (int(data["index"]) if "index" in data else 0), path.name

    return sorted(files, key=order)


def run_model(run_dir: Path) -> Optional[str]:
    for name, key in (("results.json", "model"), ("launch.json", "request")):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                continue
            value = data.get(key)
            return value.get("model") if isinstance(value, dict) else value
    return None


def render_run(run_dir, samples: int = DEFAULT_SAMPLES, out_dir: Optional[Path] = None,
               options: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Draw the first ``samples`` dumped samples of a run folder into ``out_dir`` (default RUN_DIR/pictures)."""
    import numpy as np

    from bevkit.registry import get_spec

    run_dir = Path(run_dir)
    model = run_model(run_dir)
    if model is None:
        raise ValueError(f"{run_dir} is not a run folder of the kit (no results.json or launch.json)")
    try:
        spec = get_spec(model)
    except KeyError as e:
        raise ValueError(f"{run_dir}: {e}") from None
    if not spec.pictures:
        raise ValueError(f"model {model} draws no pictures")
    module = importlib.import_module(spec.pictures)
    out_dir = Path(out_dir or run_dir / PICTURES_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    for path in prediction_files(run_dir)[:samples]:
        with np.load(path, allow_pickle=False) as data:
            sample = {key: data[key] for key in data.files}
        written += module.render(sample, out_dir, dict(options or {}))
    return written


def after_run(run_dir: Path, out=None) -> List[Path]:
    """The launcher's step after a run: draw the dumped samples (if any); problems are warnings."""
    if not (Path(run_dir) / PREDICTIONS_DIR).is_dir():
        return []
    try:
        written = render_run(run_dir)
    except Exception as e:  # noqa: BLE001 - the run's results stand; the pictures are extra
        log.get("pictures").warning(f"could not draw the pictures of {run_dir}: {type(e).__name__}: {e} "
                                    f"(retry: tools/visualize {run_dir})")
        return []
    if written:
        print(f"pictures: {Path(run_dir) / PICTURES_DIR} ({len(written)} PNGs)", file=out or sys.stdout)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tools/visualize",
                                description="Draw the predictions an evaluation run dumped (RUN_DIR/predictions/) "
                                            "as PNGs in RUN_DIR/pictures/.")
    p.add_argument("run_dir", type=Path, help="a run folder of an evaluation (eval, demo, smoke, full)")
    p.add_argument("--samples", type=int, default=DEFAULT_DUMPED,
                   help=f"samples to draw (default {DEFAULT_DUMPED}; evaluation dumps BEVKIT_PREDICTION_SAMPLES, "
                        f"default {DEFAULT_DUMPED})")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/pictures)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detections: draw boxes scoring at least this (default: the model's)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be >= 1")
    available = prediction_files(args.run_dir)
    if not available:
        print(f"error: no predictions in {args.run_dir / PREDICTIONS_DIR}: evaluate with the launcher "
              "(eval, demo, smoke or full mode) so the evaluation dumps a few samples", file=sys.stderr)
        return 2
    options = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
    try:
        written = render_run(args.run_dir, args.samples, args.out, options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.samples > len(available):
        print(f"note: {len(available)} samples were dumped; evaluate with BEVKIT_PREDICTION_SAMPLES={args.samples} "
              "to dump more", file=sys.stderr)
    for path in written:
        print(f"picture: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
