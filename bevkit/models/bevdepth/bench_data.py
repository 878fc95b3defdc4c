"""Data-loading throughput of BEVDepth's training set: every loader variant side by side, in one process.

    python -m bevkit.models.bevdepth.bench_data DATA_ROOT [--samples N] [--rounds R] [--workers W]
        [--modes online,lidar-read,kit,draft] [--psnr-samples N] [--final-dim 256x704] [--profile]

Builds the reference experiment's training dataset (2 key frames, image and BDA augmentation, depth labels) and
reports samples/s of ``__getitem__`` (``--workers 0``, one torch thread as in a DataLoader worker) or of a
DataLoader with W workers, for:

- ``online``: upstream (lidar read and projected into the cameras for every sample);
- ``lidar-read``: precomputed depth, but every key frame's lidar sweep still read (the kit before issue 15);
- ``kit``: precomputed depth and no lidar file read (the default now);
- ``draft``: ``kit`` plus JPEG draft decoding (opt-in ``BEVKIT_JPEG_DRAFT=1``).

The modes run interleaved, R rounds of N samples each (median reported), so machine load hits them alike; the
load average is printed before and after. ``--psnr-samples`` compares the draft-decoded camera images with the
default ones after the pipeline's resize, crop, flip and rotation (same augmentation draws): PSNR over 8-bit RGB.
``--profile`` prints where the kit and draft variants spend their CPU time (the next bottleneck).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

MODES = ("online", "lidar-read", "kit", "draft")


def build_dataset(data_root: str, final_dim=(256, 704)):
    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
    from bevdepth.exps.nuscenes import base_exp

    from PIL import Image

    ida = dict(base_exp.ida_aug_conf)
    dataset = NuscDetDataset(ida_aug_conf=ida, bda_aug_conf=base_exp.bda_aug_conf, classes=base_exp.CLASSES,
                             data_root=data_root, info_paths=os.path.join(data_root, "nuscenes_infos_train.pkl"),
                             is_train=True, img_conf=base_exp.img_conf, num_sweeps=1, sweep_idxes=[],
                             key_idxes=[-1], return_depth=True, use_fusion=False)
    # The augmentation's H, W must be the images' own size: the depth points are in their pixels (upstream
    # assumes 1600x900; small test images would put the depth labels outside the crop). Resize factors follow.
    cams = dataset.infos[0]["cam_infos"]
    with Image.open(os.path.join(data_root, next(iter(cams.values()))["filename"])) as img:
        width, height = img.size
    scale = final_dim[1] / ida["final_dim"][1] * ida["W"] / width
    ida.update(final_dim=tuple(final_dim), resize_lim=tuple(r * scale for r in ida["resize_lim"]), H=height,
               W=width)  # the dict the dataset holds
    return dataset


@contextlib.contextmanager
def loader_mode(mode: str) -> Iterator[None]:
    """The dataset code as ``mode`` runs it (the kit's patches are active; the older variants unwrap them)."""
    from bevdepth.datasets import nusc_det_dataset as ds

    from bevkit.models.bevdepth.speed import _img_transform_draft

    saved = (os.environ.get("BEVKIT_DEPTH_GT"), ds.NuscDetDataset.get_image, ds.img_transform)
    os.environ["BEVKIT_DEPTH_GT"] = "online" if mode == "online" else "precomputed"
    if mode in ("online", "lidar-read"):
        ds.NuscDetDataset.get_image = getattr(saved[1], "__wrapped__", saved[1])  # upstream's: reads the lidar
    if mode == "draft":
        ds.img_transform = _img_transform_draft(saved[2])
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("BEVKIT_DEPTH_GT", None)
        else:
            os.environ["BEVKIT_DEPTH_GT"] = saved[0]
        ds.NuscDetDataset.get_image, ds.img_transform = saved[1], saved[2]


def measure(dataset, samples: int, workers: int, start: int = 0, batch: int = 1) -> Tuple[float, Optional[float]]:
    """(samples per wall second, samples per CPU second of this process or None with workers) over ``samples``
    samples from index ``start``, after one warm-up sample / batch. On a shared machine the CPU-time rate is the
    one to compare: other jobs stretch the wall time, not this process's CPU time."""
    import torch
    from functools import partial

    from bevdepth.datasets.nusc_det_dataset import collate_fn

    n = len(dataset)
    if workers == 0:
        dataset[start % n]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(samples):
            dataset[(start + 1 + i) % n]
        return samples / (time.perf_counter() - t0), samples / (time.process_time() - c0)
    subset = torch.utils.data.Subset(dataset, [(start + i) % n for i in range(samples + batch)])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers, shuffle=False,
                                         collate_fn=partial(collate_fn, is_return_depth=True))
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    seen = sum(batch for _ in it)
    return seen / (time.perf_counter() - t0), None


def psnr_draft(dataset, samples: int, seed: int = 0) -> Dict[str, float]:
    """PSNR (dB) of draft-decoded vs default camera images after img_transform, over ``samples`` samples x 6
    cameras, each pair with the same augmentation draw; also the share of images decoded at reduced scale."""
    from bevdepth.datasets import nusc_det_dataset as ds
    from PIL import Image

    from bevkit.data.jpeg import draft

    transform = getattr(ds.img_transform, "__wrapped__", ds.img_transform)
    rng_state = np.random.get_state()
    np.random.seed(seed)
    mse: List[float] = []
    reduced = 0
    try:
        for idx in range(min(samples, len(dataset.infos))):
            cams = dataset.infos[idx]["cam_infos"]
            for cam in cams:
                path = os.path.join(dataset.data_root, cams[cam]["filename"])
                resize, resize_dims, crop, flip, rotate = dataset.sample_ida_augmentation()
                full = Image.open(path)
                size = full.size
                ref, _ = transform(full, resize, resize_dims, crop, flip, rotate)
                img = draft(Image.open(path), resize_dims)
                reduced += img.size != size
                got, _ = transform(img, resize, resize_dims, crop, flip, rotate)
                a, b = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
                mse.append(float(((a - b) ** 2).mean()))
    finally:
        np.random.set_state(rng_state)
    mean = statistics.fmean(mse)
    return {"images": len(mse), "psnr_db": 10 * math.log10(255.0 ** 2 / mean) if mean > 0 else math.inf,
            "worst_psnr_db": 10 * math.log10(255.0 ** 2 / max(mse)) if max(mse) > 0 else math.inf,
            "reduced_share": reduced / len(mse)}


def profile(dataset, samples: int, mode: str = "kit", top: int = 6) -> List[Tuple[str, float]]:
    """The functions where ``__getitem__`` spends its own time (cProfile, CPU clock), with their shares."""
    import cProfile
    import pstats

    with loader_mode(mode):
        dataset[0]
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for i in range(samples):
            dataset[1 + i % (len(dataset) - 1)]
        prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    ranked = sorted(((f"{func[2]} ({os.path.basename(func[0])}:{func[1]})" if func[0] != "~" else func[2], v[2])
                     for func, v in stats.items()), key=lambda kv: -kv[1])
    return [(name, sec / total) for name, sec in ranked[:top]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.models.bevdepth.bench_data",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--samples", type=int, default=10, help="samples per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--psnr-samples", type=int, default=4, help="0: no PSNR of the draft images")
    parser.add_argument("--final-dim", default="256x704")
    parser.add_argument("--profile", action="store_true", help="where kit and draft loading spend their CPU time")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    from .runtime import activate

    activate(device="cpu")
    final_dim = tuple(int(v) for v in args.final_dim.split("x"))
    dataset = build_dataset(os.path.abspath(args.data_root), final_dim)
    if args.workers == 0:
        import torch

        torch.set_num_threads(1)  # as in a DataLoader worker process (torch sets 1 thread there)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"{len(dataset)} train samples; {args.rounds} rounds x {args.samples} samples per mode, "
          f"workers {args.workers}, {final_dim[0]}x{final_dim[1]}")
    rates: Dict[str, List[Tuple[float, Optional[float]]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            with loader_mode(mode):
                rates[mode].append(measure(dataset, args.samples, args.workers, start=r * args.samples))
    cpu = args.workers == 0
    key = 1 if cpu else 0
    base = statistics.median(v[key] for v in rates[modes[0]])
    print("mode        samples/s (wall)  " + ("samples/CPU-s  " if cpu else "") + f"speed-up vs {modes[0]}"
          + (" (CPU time)" if cpu else ""))
    for mode in modes:
        wall = statistics.median(v[0] for v in rates[mode])
        line = f"{mode:<11} {wall:16.2f}  "
        if cpu:
            line += f"{statistics.median(v[1] for v in rates[mode]):13.2f}  "
        med = statistics.median(v[key] for v in rates[mode])
        print(line + f"x{med / base:.2f}")
    if args.psnr_samples and "draft" in modes:
        p = psnr_draft(dataset, args.psnr_samples)
        print(f"PSNR of draft vs default images after the pipeline's resize: {p['psnr_db']:.2f} dB mean, "
              f"{p['worst_psnr_db']:.2f} dB worst, over {p['images']} images "
              f"({p['reduced_share']:.0%} decoded at reduced scale)")
    if args.profile:
        for mode in ("kit", "draft"):
            shares = profile(dataset, args.samples, mode)
            print(f"{mode} CPU time by function: " + ", ".join(f"{name} {share:.0%}" for name, share in shares))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
