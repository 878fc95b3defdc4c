"""Data-loading throughput of FB-OCC's training set (the reference recipe's pipeline), loader variants side by side.

    python -m bevkit.models.fbocc.bench_data DATA_ROOT [--fbbev DIR] [--samples N] [--rounds R] [--workers W]
        [--modes kit,draft] [--config F] [--profile]

Builds the training dataset of ``fbocc/configs/fbocc_r50_8p.py`` on DATA_ROOT (6 cameras resized to 256x704 with
augmentation, the key frame's lidar projected into them for the depth labels, the Occ3D labels) and reports
samples/s of ``__getitem__`` (``--workers 0``, one torch thread as in a DataLoader worker: per wall second and
per CPU second of this process, the one to compare on a shared machine) or of a DataLoader with W workers, for:

- ``kit``: the default pipeline (issue 15 changes nothing in FB-OCC's ``__getitem__``: its speed techniques are on
  the device and in the DataLoader's pinned memory);
- ``draft``: JPEG draft decoding (opt-in ``BEVKIT_JPEG_DRAFT=1``, :mod:`bevkit.data.jpeg`).

Modes run interleaved, R rounds of N samples (median reported); the load average is printed before and after.
``--profile`` adds the share of ``__getitem__`` time spent in each pipeline step (the next bottleneck).
Run it as its own process: FB-BEV's vendored mmdet3d must not share a process with BEVDepth's.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from bevkit import REPO_ROOT

MODES = ("kit", "draft")
CONFIG = REPO_ROOT / "fbocc" / "configs" / "fbocc_r50_8p.py"


def build_dataset(data_root: str, config: Path = CONFIG):
    from mmcv import Config
    from mmdet3d.datasets import build_dataset as build

    from bevkit.models.fbocc.config import finalize

    cfg = Config.fromfile(str(config))
    cfg.data_root = data_root
    finalize(cfg)
    return build(cfg.data.train)


@contextlib.contextmanager
def loader_mode(mode: str) -> Iterator[None]:
    from mmdet3d.datasets.pipelines import loading

    from bevkit.models.fbocc.patches.speed import _jpeg_draft

    saved = loading.PrepareImageInputs.img_transform_core
    if mode == "draft":
        loading.PrepareImageInputs.img_transform_core = _jpeg_draft(saved)
    try:
        yield
    finally:
        loading.PrepareImageInputs.img_transform_core = saved


def measure(dataset, samples: int, workers: int, start: int = 0) -> Tuple[float, Optional[float]]:
    """(samples per wall second, samples per CPU second or None with workers), after one warm-up sample."""
    import torch
    from mmcv.parallel import collate

    n = len(dataset)
    if workers == 0:
        dataset[start % n]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(samples):
            dataset[(start + 1 + i) % n]
        return samples / (time.perf_counter() - t0), samples / (time.process_time() - c0)
    subset = torch.utils.data.Subset(dataset, [(start + i) % n for i in range(samples + 1)])
    loader = torch.utils.data.DataLoader(subset, batch_size=1, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    seen = sum(1 for _ in it)
    return seen / (time.perf_counter() - t0), None


def profile(dataset, samples: int) -> List[Tuple[str, float]]:
    """CPU seconds per sample of each pipeline step (the dataset's ``pipeline.transforms``), largest first."""
    transforms = dataset.pipeline.transforms
    spent: Dict[str, float] = {}

    def timed(transform):
        def run(results):
            c0 = time.process_time()
            out = transform(results)
            name = type(transform).__name__
            spent[name] = spent.get(name, 0.0) + time.process_time() - c0
            return out

        return run

    dataset.pipeline.transforms = [timed(t) for t in transforms]  # Compose calls each in turn
    try:
        for i in range(samples):
            dataset[i % len(dataset)]
    finally:
        dataset.pipeline.transforms = transforms
    return sorted(((k, v / samples) for k, v in spent.items()), key=lambda kv: -kv[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevkit.models.fbocc.bench_data",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root")
    parser.add_argument("--fbbev", type=Path, default=None, help="FB-BEV checkout (default: the kit's upstream/)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--samples", type=int, default=10, help="samples per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="CPU time per pipeline step")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    from bevkit import upstream
    from bevkit.models.fbocc.runtime import activate

    fbbev = args.fbbev or upstream.checkout_dir("FB-BEV")
    activate(str(Path(fbbev) / "tools" / "train.py"), device="cpu")
    dataset = build_dataset(os.path.abspath(args.data_root), args.config)
    if args.workers == 0:
        import torch

        torch.set_num_threads(1)  # as in a DataLoader worker process (torch sets 1 thread there)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"{len(dataset)} train samples; {args.rounds} rounds x {args.samples} samples per mode, "
          f"workers {args.workers}")
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
        line = f"{mode:<11} {statistics.median(v[0] for v in rates[mode]):16.2f}  "
        if cpu:
            line += f"{statistics.median(v[1] for v in rates[mode]):13.2f}  "
        print(line + f"x{statistics.median(v[key] for v in rates[mode]) / base:.2f}")
    if args.profile:
        steps = profile(dataset, args.samples)
        total = sum(s for _, s in steps)
        print("CPU time per sample by pipeline step: " + ", ".join(f"{name} {sec * 1000:.0f} ms ({sec / total:.0%})"
                                                                   for name, sec in steps))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
