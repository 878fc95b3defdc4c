"""BEVDepth's pictures of predictions: what evaluation dumps, and the PNGs drawn from it (:mod:`bevkit.visualize`).

Dump (runtime patch 'prediction_samples' on the experiment's ``eval_step``, rank 0): for the first
:func:`bevkit.visualize.dump_count` samples that rank evaluates, the decoded boxes, scores and labels exactly as
the evaluator receives them (ego frame of the key frame: the mean of the cameras' ego poses), the predicted depth
of the key frame's front camera (a forward hook on the depth net during that same forward pass: its softmax over
the depth bins, as the view transformer uses it) with the network's input image, the ground-truth boxes of the
sample in the same frame (the val info file, filtered like the dataset's ``get_gt``), and per camera the image
path and the ego -> pixel projection.

Pictures per sample: ``<token>_boxes_bev.png`` (ground truth and predictions from above; the score threshold is
written on it), ``<token>_boxes_cameras.png`` (the six images with the boxes projected) and ``<token>_depth.png``
(front camera: the network's input and its predicted depth).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict, List

from bevkit.visualize import (BOX_EDGES, CLASS_COLOURS, Dumper, box_corners, ego_to_image, guarded, pose, project,
                              pyplot, read_image)

#: predictions drawn: score at least this (tools/visualize --score-threshold changes it)
SCORE_THRESHOLD = 0.3
DEPTH_CAMERA = "CAM_FRONT"
BEV_RANGE = 51.2  # m: the reference grid's half extent
GT_COLOUR = (0.1, 0.75, 0.1)

_DUMPER = Dumper()
_INFOS: Dict[str, Dict[str, Any]] = {}


# ------------------------------------------------------------------------------------------------ dumping
def _val_infos(path: str) -> Dict[str, Any]:
    if path not in _INFOS:
        import pickle

        with open(path, "rb") as f:  # the info file upstream's dataset reads (scripts/gen_info.py: a list)
            _INFOS[path] = {info["sample_token"]: info for info in pickle.load(f)}
    return _INFOS[path]


def gt_boxes_in_ego(info: Dict[str, Any], classes, ego2global):
    """(N, 7) boxes (x, y, z centre, length, width, height, yaw) and (N,) labels of the sample's annotations in
    the ego frame, kept like NuscDetDataset.get_gt keeps them (a class of the model, a lidar or radar point)."""
    import numpy as np
    from nuscenes.eval.detection.utils import category_to_detection_name  # the same map as the dataset's

    from bevkit.visualize import quaternion_matrix

    global2ego = np.linalg.inv(ego2global)
    boxes, labels = [], []
    for ann in info["ann_infos"]:
        name = category_to_detection_name(ann["category_name"])
        if name not in classes or ann["num_lidar_pts"] + ann["num_radar_pts"] <= 0:
            continue
        centre = global2ego[:3, :3] @ np.asarray(ann["translation"], dtype=float) + global2ego[:3, 3]
        rotation = global2ego[:3, :3] @ quaternion_matrix(ann["rotation"])
        w, length, h = ann["size"]
        boxes.append([*centre, length, w, h, math.atan2(rotation[1, 0], rotation[0, 0])])
        labels.append(list(classes).index(name))
    return np.array(boxes, dtype=np.float32).reshape(-1, 7), np.array(labels, dtype=np.int64)


def dump(exp, batch, results, captured) -> None:
    import numpy as np
    import torch

    sweep_imgs, _mats, _, img_metas = batch[:4]
    model = exp.model.module if isinstance(exp.model, torch.nn.parallel.DistributedDataParallel) else exp.model
    backbone = model.backbone
    cams = list(exp.ida_aug_conf["cams"])
    front = cams.index(DEPTH_CAMERA) if DEPTH_CAMERA in cams else 0
    bins = torch.arange(*backbone.d_bound, dtype=torch.float32)
    depth = None
    if captured:
        probs = captured[0][:, :backbone.depth_channels].float().softmax(dim=1)
        depth = (probs * bins.view(1, -1, 1, 1)).sum(dim=1)                 # expected depth per pixel (m)
        depth = depth.view(len(img_metas), len(cams), *depth.shape[-2:])
    infos = _val_infos(exp.val_info_paths)
    mean, std = (np.asarray(exp.img_conf[k], dtype=np.float32) for k in ("img_mean", "img_std"))
    for i, meta in enumerate(img_metas):
        if not _DUMPER.wanted():
            return
        info = infos[meta["token"]]
        ego2global = pose(meta["ego2global_rotation"], meta["ego2global_translation"])
        gt_boxes, gt_labels = gt_boxes_in_ego(info, exp.class_names, ego2global)
        projections = []
        for cam in cams:
            cam_info = info["cam_infos"][cam]
            sensor, ego = cam_info["calibrated_sensor"], cam_info["ego_pose"]
            projections.append(ego_to_image(sensor["camera_intrinsic"], pose(sensor["rotation"], sensor["translation"]),
                                            pose(ego["rotation"], ego["translation"]), ego2global))
        boxes, scores, labels = (np.asarray(v) for v in results[i][:3])
        image = sweep_imgs[i, 0, front].detach().float().cpu().permute(1, 2, 0).numpy() * std + mean
        if exp.img_conf.get("to_rgb"):
            # the dataset normalizes PIL's RGB with to_rgb=True (a BGR -> RGB swap), so the network sees BGR:
            # swap back to show the true colours
            image = image[..., ::-1]
        arrays = {
            "index": np.array(_DUMPER.written),  # the order this rank evaluated them in
            "boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32), "labels": labels.astype(np.int64),
            "classes": np.array(list(exp.class_names)), "gt_boxes": gt_boxes, "gt_labels": gt_labels,
            "cameras": np.array(cams), "images": np.array([info["cam_infos"][c]["filename"] for c in cams]),
            "ego2img": np.stack(projections), "depth_camera": np.array(cams[front]),
            "depth_input": np.clip(image, 0, 255).astype(np.uint8), "d_bound": np.asarray(backbone.d_bound),
            "data_root": np.array(str(exp.data_root))}
        if depth is not None:
            arrays["depth"] = depth[i, front].cpu().numpy().astype(np.float16)
        _DUMPER.save(meta["token"], arrays)


def dump_on_eval_step(original):
    """The experiment's eval_step: for the samples still to dump, also catch the key frame's depth and dump."""

    @functools.wraps(original)
    def eval_step(self, batch, batch_idx, prefix):
        if batch_idx == 0:
            _DUMPER.restart()
        if prefix == "predict" or not _DUMPER.wanted():  # the test split has no ground truth to draw
            return original(self, batch, batch_idx, prefix)
        captured: List[Any] = []

        def keep_first(_module, _inputs, output):
            if not captured:  # the key frame's sweep runs first
                captured.append(output.detach())

        model = getattr(self.model, "module", self.model)
        handle = guarded("hooking the BEVDepth depth net", model.backbone.depth_net.register_forward_hook,
                         keep_first)
        try:
            results = original(self, batch, batch_idx, prefix)
        finally:
            if handle is not None:
                handle.remove()
        guarded("dumping BEVDepth predictions", dump, self, batch, results, captured)
        return results

    return eval_step


# ------------------------------------------------------------------------------------------------ drawing
def _colour(name: str):
    return tuple(c / 255 for c in CLASS_COLOURS.get(name, (0, 0, 0)))


def _chosen(sample: Dict[str, Any], threshold: float):
    keep = sample["scores"] >= threshold
    return sample["boxes"][keep], sample["labels"][keep], sample["scores"][keep]


def draw_bev(sample: Dict[str, Any], path: Path, threshold: float) -> Path:
    import numpy as np
    from matplotlib.lines import Line2D

    plt = pyplot()
    classes = [str(c) for c in sample["classes"]]
    boxes, labels, scores = _chosen(sample, threshold)
    fig, ax = plt.subplots(figsize=(8, 8.6))

    def outline(box, colour, style, width, zorder):
        corners = box_corners(box[None, :7])[0, :4]            # bottom face, in the ego frame
        # seen from above with x (forward) up and y (left) to the left: plot (y, x) with the y axis inverted
        loop = np.vstack([corners, corners[:1]])
        ax.plot(loop[:, 1], loop[:, 0], linestyle=style, color=colour, linewidth=width, zorder=zorder)
        front = corners[:2].mean(axis=0)
        ax.plot([box[1], front[1]], [box[0], front[0]], linestyle=style, color=colour, linewidth=width,
                zorder=zorder)

    for box, label in zip(sample["gt_boxes"], sample["gt_labels"]):
        outline(box, GT_COLOUR, "--", 1.2, 3)  # on top: the predictions must not hide the ground truth
    for box, label, score in zip(boxes, labels, scores):
        outline(box, _colour(classes[label]), "-", 1.4, 2)
        ax.text(box[1], box[0], f"{score:.2f}", fontsize=6, color=_colour(classes[label]))
    ax.plot([0], [0], marker="^", color="black", markersize=8)
    ax.set_xlim(BEV_RANGE, -BEV_RANGE)
    ax.set_ylim(-BEV_RANGE, BEV_RANGE)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("y (m, left +)")
    ax.set_ylabel("x (m, forward +)")
    shown = sorted({int(v) for v in labels} | {int(v) for v in sample["gt_labels"]})
    handles = [Line2D([], [], color=GT_COLOUR, linestyle="--", label=f"ground truth ({len(sample['gt_boxes'])})")]
    handles += [Line2D([], [], color=_colour(classes[k]), label=classes[k]) for k in shown]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set_title(f"BEVDepth boxes from above, {sample['token']}\npredictions with score >= {threshold:.2f}: "
                 f"{len(boxes)} of {len(sample['boxes'])} (label: score); line: heading", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw_boxes_2d(ax, boxes, ego2img, colour, width, style, size) -> None:
    corners = box_corners(boxes)
    for box in corners:
        uv, z = project(box, ego2img)
        if (z < 0.5).any():
            continue  # partly behind the camera
        if (uv[:, 0] < 0).all() or (uv[:, 0] > size[1]).all() or (uv[:, 1] < 0).all() or (uv[:, 1] > size[0]).all():
            continue
        for a, b in BOX_EDGES:
            ax.plot(uv[[a, b], 0], uv[[a, b], 1], color=colour, linewidth=width, linestyle=style)


def draw_cameras(sample: Dict[str, Any], path: Path, threshold: float) -> Path:
    plt = pyplot()
    classes = [str(c) for c in sample["classes"]]
    boxes, labels, _scores = _chosen(sample, threshold)
    data_root = str(sample.get("data_root", "")) or None
    fig, axes = plt.subplots(2, 3, figsize=(15, 6))
    for ax, name, image, ego2img in zip(axes.ravel(), sample["cameras"], sample["images"], sample["ego2img"]):
        picture = read_image(str(image), data_root)
        size = picture.shape[:2] if picture is not None else (900, 1600)
        if picture is not None:
            ax.imshow(picture)
        _draw_boxes_2d(ax, sample["gt_boxes"], ego2img, GT_COLOUR, 0.8, "--", size)
        for k in sorted(set(int(v) for v in labels)):
            _draw_boxes_2d(ax, boxes[labels == k], ego2img, _colour(classes[k]), 1.2, "-", size)
        ax.set_xlim(0, size[1])
        ax.set_ylim(size[0], 0)
        ax.set_title(str(name), fontsize=9)
        ax.axis("off")
    fig.suptitle(f"BEVDepth boxes projected into the cameras, {sample['token']}: ground truth dashed green, "
                 f"predictions with score >= {threshold:.2f} in class colours", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_depth(sample: Dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5))
    axes[0].imshow(sample["depth_input"])
    axes[0].set_title(f"{sample['depth_camera']}: the network's input ({sample['depth_input'].shape[1]} x "
                      f"{sample['depth_input'].shape[0]})", fontsize=9)
    low, high, step = (float(v) for v in sample["d_bound"])
    shown = axes[1].imshow(sample["depth"].astype("float32"), cmap="turbo", vmin=low, vmax=high,
                           interpolation="nearest")
    axes[1].set_title(f"predicted depth (expectation over the {int(round((high - low) / step))} depth bins, m; "
                      f"{sample['depth'].shape[1]} x {sample['depth'].shape[0]} feature cells)", fontsize=9)
    fig.colorbar(shown, ax=axes[1], label="depth (m)")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render(sample: Dict[str, Any], out_dir: Path, options: Dict[str, Any]) -> List[Path]:
    token = str(sample["token"])
    threshold = float(options.get("score_threshold", SCORE_THRESHOLD))
    written = [draw_bev(sample, out_dir / f"{token}_boxes_bev.png", threshold),
               draw_cameras(sample, out_dir / f"{token}_boxes_cameras.png", threshold)]
    if "depth" in sample:
        written.append(draw_depth(sample, out_dir / f"{token}_depth.png"))
    return written

