"""FB-OCC's pictures of predictions: what evaluation dumps, and the PNGs drawn from it (:mod:`bevkit.visualize`).

Dump (runtime patch 'fbocc-prediction-samples' on ``NuScenesDataset.evaluate_occupancy``, rank 0, where every
rank's predictions have been gathered): for :func:`bevkit.visualize.dump_count` samples spread over the val split,
the predicted Occ3D classes (the evaluated ``pred_occupancy``), the ground truth and camera mask the evaluator
reads, and per camera the image path and the ego -> pixel projection.

Pictures per sample: ``<token>_occupancy_bev.png`` (top-down views of ground truth and prediction side by side:
per column the class of the highest occupied voxel; columns no camera sees, which the mIoU does not score, greyed)
and ``<token>_occupancy_cameras.png`` (the six images with the predicted occupied surface voxels projected, nearest
on top).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

from bevkit import env
from bevkit.data.schema import OCC3D_CLASSES, OCC_FREE, OCC_RANGE, OCC_VOXEL
from bevkit.visualize import (CLASS_COLOURS, Dumper, ego_to_image, focal_length, guarded, pose, project, pyplot,
                              read_image)

FREE_COLOUR = (255, 255, 255)
UNSEEN_COLOUR = (205, 205, 205)
CAMERA_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")

_DUMPER = Dumper()


# ------------------------------------------------------------------------------------------------ dumping
def _spread(n: int, count: int) -> List[int]:
    """``count`` positions spread evenly over ``n`` (first and last included)."""
    if count >= n:
        return list(range(n))
    if count == 1:
        return [0]
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def dump(dataset, occ_results) -> None:
    import numpy as np

    _DUMPER.restart()
    wanted = _DUMPER.wanted()
    if not wanted:
        return
    seen, unique = set(), []
    for result in occ_results:
        if result.get("pred_occupancy") is not None and result["index"] not in seen:
            seen.add(result["index"])
            unique.append(result)
    unique.sort(key=lambda r: r["index"])
    data_root = env.get("BEVKIT_DATA_ROOT") or ""
    for position in _spread(len(unique), wanted):
        result = unique[position]
        info = dataset.data_infos[result["index"]]
        gt = np.load(os.path.join(dataset.occupancy_path, info["scene_name"], info["token"], "labels.npz"))
        ego2global = pose(info["ego2global_rotation"], info["ego2global_translation"])
        names = [c for c in CAMERA_ORDER if c in info["cams"]]
        cams = [info["cams"][c] for c in names]
        projections = np.stack([ego_to_image(c["cam_intrinsic"], pose(c["sensor2ego_rotation"],
                                                                      c["sensor2ego_translation"]),
                                             pose(c["ego2global_rotation"], c["ego2global_translation"]),
                                             ego2global) for c in cams])
        _DUMPER.save(info["token"], {
            "index": np.array(result["index"]), "scene": np.array(info["scene_name"]),
            "pred": np.asarray(result["pred_occupancy"]).astype(np.uint8),
            "gt": gt["semantics"].astype(np.uint8), "mask_camera": gt["mask_camera"].astype(bool),
            "cameras": np.array(names), "images": np.array([c["data_path"] for c in cams]),
            "ego2img": projections, "data_root": np.array(data_root)})


def dump_on_evaluate_occupancy(original):
    """NuScenesDataset.evaluate_occupancy: first dump a few samples of what it is about to score."""
    import functools

    @functools.wraps(original)
    def evaluate_occupancy(self, occ_results, *args, **kwargs):
        guarded("dumping FB-OCC predictions", dump, self, occ_results)
        return original(self, occ_results, *args, **kwargs)

    return evaluate_occupancy


# ------------------------------------------------------------------------------------------------ drawing
def palette():
    import numpy as np

    colours = np.array([CLASS_COLOURS.get(name, FREE_COLOUR) for name in OCC3D_CLASSES[:OCC_FREE]]
                       + [FREE_COLOUR], dtype=np.uint8)
    return colours


def top_down(semantics):
    """(X, Y) class of the highest non-free voxel per column (OCC_FREE where the column is empty)."""
    import numpy as np

    occupied = semantics != OCC_FREE
    nz = semantics.shape[2]
    top = nz - 1 - np.argmax(occupied[:, :, ::-1], axis=2)           # highest occupied layer
    cls = np.take_along_axis(semantics, top[..., None], axis=2)[..., 0].astype(np.int64)
    cls[~occupied.any(axis=2)] = OCC_FREE
    return cls


def _rgb(classes, seen):
    """Class colours; columns no camera sees (not scored by the mIoU) blended towards grey."""
    import numpy as np

    out = palette()[classes].astype(np.float32)
    out[~seen] = 0.35 * out[~seen] + 0.65 * np.asarray(UNSEEN_COLOUR, dtype=np.float32)
    return out.astype(np.uint8)


def bev_image(classes, seen):
    """The RGB image of an (X, Y) class map as seen from above: forward (+x) up, left (+y) to the left."""
    return _rgb(classes, seen)[::-1, ::-1]


def _legend(fig, present) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=[c / 255 for c in CLASS_COLOURS[OCC3D_CLASSES[i]]], edgecolor="black",
                     linewidth=0.3, label=OCC3D_CLASSES[i]) for i in sorted(present) if 0 <= i < OCC_FREE]
    handles.append(Patch(facecolor=[c / 255 for c in UNSEEN_COLOUR], label="no camera sees it (greyed, not scored)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)


def draw_bev(sample: Dict[str, Any], path: Path) -> Path:
    import numpy as np

    plt = pyplot()
    mask = sample["mask_camera"].astype(bool)
    seen = mask.any(axis=2)
    views = {"ground truth": top_down(sample["gt"]), "prediction": top_down(sample["pred"])}
    x0, y0, _, x1, y1, _ = OCC_RANGE
    fig, axes = plt.subplots(1, 2, figsize=(12, 7.2))
    for ax, (title, classes) in zip(axes, views.items()):
        ax.imshow(bev_image(classes, seen), extent=(y1, y0, x0, x1), interpolation="nearest")
        ax.plot([0], [0], marker="^", color="black", markersize=7)
        ax.set_title(title)
        ax.set_xlabel("y (m, left +)")
        ax.set_ylabel("x (m, forward +)")
    agree = (views["ground truth"] == views["prediction"])[seen].mean() if seen.any() else float("nan")
    fig.suptitle(f"FB-OCC occupancy from above, {sample['scene']} / {sample['token']}\n"
                 f"highest occupied voxel per column ({OCC_VOXEL} m voxels); columns seen by a camera where "
                 f"the top class agrees: {agree:.0%}", fontsize=10)
    present = set(np.unique(views["ground truth"])) | set(np.unique(views["prediction"]))
    _legend(fig, present)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def surface_voxels(semantics):
    """(N, 3) centres and (N,) classes of the occupied voxels with at least one free neighbour."""
    import numpy as np

    occupied = semantics != OCC_FREE
    padded = np.pad(occupied, 1, constant_values=False)
    inner = np.ones_like(occupied)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    idx = np.argwhere(occupied & ~inner)
    centres = np.asarray(OCC_RANGE[:3]) + (idx + 0.5) * OCC_VOXEL
    return centres, semantics[tuple(idx.T)]


def draw_cameras(sample: Dict[str, Any], path: Path) -> Path:
    import numpy as np

    plt = pyplot()
    centres, classes = surface_voxels(sample["pred"])
    colours = palette()[classes] / 255.0
    data_root = str(sample.get("data_root", "")) or None
    fig, axes = plt.subplots(2, 3, figsize=(15, 6.2))
    for ax, name, image, ego2img in zip(axes.ravel(), sample["cameras"], sample["images"], sample["ego2img"]):
        picture = read_image(str(image), data_root)
        height, width = picture.shape[:2] if picture is not None else (900, 1600)
        if picture is not None:
            ax.imshow(picture)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        uv, z = project(centres, ego2img)
        keep = (z > 0.5) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
        order = np.argsort(-z[keep])                                        # far first: the nearest stays on top
        points_per_pixel = ax.get_window_extent().width * 72.0 / fig.dpi / width
        size = np.clip(OCC_VOXEL * focal_length(ego2img) / z[keep][order] * points_per_pixel, 0.5, 30) ** 2
        ax.scatter(uv[keep][order, 0], uv[keep][order, 1], s=size, c=colours[keep][order], marker="s",
                   alpha=0.45, linewidths=0)
        ax.set_title(str(name), fontsize=9)
        ax.axis("off")
    _legend(fig, set(np.unique(classes)))
    fig.suptitle(f"FB-OCC predicted occupancy projected into the cameras (surface voxels), {sample['token']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def render(sample: Dict[str, Any], out_dir: Path, options: Dict[str, Any]) -> List[Path]:
    token = str(sample["token"])
    return [draw_bev(sample, out_dir / f"{token}_occupancy_bev.png"),
            draw_cameras(sample, out_dir / f"{token}_occupancy_cameras.png")]
