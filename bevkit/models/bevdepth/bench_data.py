"""Data-loading throughput of BEVDepth's training set, with online or precomputed depth ground truth.

    python -m bevkit.models.bevdepth.bench_data DATA_ROOT [--depth online|precomputed|both]
        [--samples N] [--workers W] [--final-dim 256x704]

Builds the reference experiment's training dataset (2 key frames, image and BDA augmentation, depth
labels) and reports samples/s of ``__getitem__`` (``--workers 0``) or of a DataLoader with W workers.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence


def build_dataset(data_root: str, final_dim=(256, 704)):
    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
    from bevdepth.exps.nuscenes import base_exp

    ida = dict(base_exp.ida_aug_conf)
    if tuple(final_dim) != tuple(ida["final_dim"]):
        scale = final_dim[1] / ida["final_dim"][1]
        ida.update(final_dim=tuple(final_dim), resize_lim=tuple(r * scale for r in ida["resize_lim"]))
    return NuscDetDataset(ida_aug_conf=ida, bda_aug_conf=base_exp.bda_aug_conf, classes=base_exp.CLASSES,
                          data_root=data_root, info_paths=os.path.join(data_root, "nuscenes_infos_train.pkl"),
                          is_train=True, img_conf=base_exp.img_conf, num_sweeps=1, sweep_idxes=[],
                          key_idxes=[-1], return_depth=True, use_fusion=False)


def measure(dataset, samples: int, workers: int, batch: int = 1) -> float:
    """samples/s over ``samples`` samples (after one warm-up sample / batch)."""
    import torch
    from functools import partial

    from bevdepth.datasets.nusc_det_dataset import collate_fn

    samples = min(samples, len(dataset))
    if workers == 0:
        dataset[0]
        start = time.perf_counter()
        for i in range(samples):
            dataset[i % len(dataset)]
        return samples / (time.perf_counter() - start)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False,
                                         collate_fn=partial(collate_fn, is_return_depth=True))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    seen = 0
    for _ in range(max(1, samples // batch)):
        try:
            next(it)
        except StopIteration:
            break
        seen += batch
    return seen / (time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.models.bevdepth.bench_data", description=__doc__)
    parser.add_argument("data_root")
    parser.add_argument("--depth", choices=["online", "precomputed", "both"], default="both")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--final-dim", default="256x704")
    args = parser.parse_args(argv)
    from .runtime import activate

    activate(device="cpu")
    final_dim = tuple(int(v) for v in args.final_dim.split("x"))
    dataset = build_dataset(os.path.abspath(args.data_root), final_dim)
    modes = ["online", "precomputed"] if args.depth == "both" else [args.depth]
    for mode in modes:
        os.environ["BEVKIT_DEPTH_GT"] = mode
        rate = measure(dataset, args.samples, args.workers)
        print(f"depth {mode:<11} workers {args.workers}: {rate:.2f} samples/s "
              f"({args.samples} samples, {final_dim[0]}x{final_dim[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
