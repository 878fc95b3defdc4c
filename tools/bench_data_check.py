"""Time the default data check on a data root and estimate it for full nuScenes from per-file costs.

    python tools/bench_data_check.py DATA_ROOT [--repeat 3]

DATA_ROOT: a prepared data root (both models' info files; e.g. the synthetic one after both data preparations).
Prints, in one run:

- the wall and CPU time of ``bevkit.data.validate.validate(model, DATA_ROOT)`` (the default check) per model;
- the cost per file of each cheap check (JPEG markers, lidar size, Occ3D zip directory, depth_gt size, one info
  path), warm (files in the page cache) and cold (each file's pages dropped first with posix_fadvise, so the
  read goes to the disk of this machine; one thread, and the validator's threads), next to decoding one image
  (what --full does per image);
- the estimate for full nuScenes v1.0-trainval (34,149 key samples: 28,130 train + 6,019 val) = file counts x
  per-file cost, for the cheap checks the default runs on every file (warm: one thread's wall and CPU time;
  cold: the validator's threads). Not included: loading the info pickles and the tables (unchanged by the
  per-file checks).

The figures are medians over ``--repeat`` passes; the machine's load shows in the wall times, so the CPU times
are printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bevkit.data import filecheck  # noqa: E402
from bevkit.data.schema import OCC_KEYS, OCC_SHAPE, in_root  # noqa: E402

#: nuScenes v1.0-trainval key samples (train + val) and what each has (cameras, lidar, Occ3D labels)
NUSC_SAMPLES = 28130 + 6019
NUSC_TRAIN = 28130
COUNTS = {
    "jpeg markers": 6 * NUSC_SAMPLES,          # every camera keyframe
    "lidar size": NUSC_SAMPLES,                # every LIDAR_TOP keyframe
    "Occ3D zip directory": NUSC_SAMPLES,       # every train/val sample's labels.npz (FB-OCC)
    "depth_gt size": 6 * NUSC_TRAIN,           # every train camera keyframe's depth file (BEVDepth)
    # info paths: FB-OCC 7 per sample (6 cameras + lidar, no sweeps); BEVDepth 7 + 6x6 camera sweeps + 10 lidar
    # sweeps (upstream gen_info's maxima)
    "info path (fbocc)": 7 * NUSC_SAMPLES,
    "info path (bevdepth)": 53 * NUSC_SAMPLES,
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _drop(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def per_file(fn, paths, repeat, cold, workers):
    """Median seconds per file of ``fn`` over ``paths`` (wall, cpu), on ``workers`` threads as the check runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        if cold:
            _drop(paths)
        w0, c0 = time.perf_counter(), _cpu()
        filecheck.each(fn, paths, workers=workers)
        walls.append((time.perf_counter() - w0) / len(paths))
        cpus.append((_cpu() - c0) / len(paths))
    return statistics.median(walls), statistics.median(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_root", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    root = a.data_root.resolve()
    from bevkit.data.validate import validate

    out = {"data_root": str(root), "default_check": {}, "per_file_us": {}, "estimate_full_nuscenes_s": {}}
    for model in ("fbocc", "bevdepth"):
        runs = []
        for _ in range(a.repeat):
            w0, c0 = time.perf_counter(), _cpu()
            problems = validate(model, root)
            runs.append((time.perf_counter() - w0, _cpu() - c0))
        if problems:
            print(f"{model}: the data root has problems; prepare it first:\n" + "\n".join(map(str, problems)))
            return 1
        out["default_check"][model] = {"wall_s": round(statistics.median(r[0] for r in runs), 3),
                                       "cpu_s": round(statistics.median(r[1] for r in runs), 3)}

    jpgs = sorted(str(p) for p in (root / "samples").glob("CAM_*/*.jpg"))
    bins = sorted(str(p) for p in (root / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))
    npzs = sorted(str(p) for p in (root / "gts").rglob("labels.npz"))
    depth = sorted(str(p) for p in (root / "depth_gt").glob("*.bin"))
    with open(root / "bevdetv2-nuscenes_infos_train.pkl", "rb") as f:
        infos = pickle.load(f)["infos"]
    info_paths = [info["lidar_path"] for info in infos] + [c["data_path"] for info in infos
                                                           for c in info["cams"].values()]

    def decode(p):
        from PIL import Image
        with Image.open(p) as im:
            im.load()

    voxels = int(__import__("numpy").prod(OCC_SHAPE))
    checks = {
        "jpeg markers": (filecheck.jpeg, jpgs),
        "lidar size": (filecheck.lidar, bins),
        "Occ3D zip directory": (lambda p: filecheck.npz(p, OCC_KEYS, voxels), npzs),
        "depth_gt size": (lambda p: filecheck.sized(p, filecheck.DEPTH_ROW_BYTES, "depth"), depth),
        "info path": (in_root(root), info_paths),
        "image decode (--full)": (decode, jpgs[:60]),
    }
    for name, (fn, paths) in checks.items():
        if not paths:
            continue
        row = {"files": len(paths)}
        for cold, workers in ((False, 1), (True, 1), (True, filecheck.WORKERS)):
            if cold and name == "info path":
                continue  # a string operation
            wall, cpu = per_file(fn, paths, a.repeat, cold, workers)
            key = ("cold" if cold else "warm") + ("" if workers == 1 else f"_{workers}_threads")
            row[f"{key}_wall_us"], row[f"{key}_cpu_us"] = round(wall * 1e6, 1), round(cpu * 1e6, 1)
        out["per_file_us"][name] = row

    for name, count in COUNTS.items():
        row = out["per_file_us"].get("info path" if name.startswith("info path") else name)
        if row is None:  # no such files in this data root (e.g. depth_gt/ not made): not estimated
            continue
        est = {"files": count, "warm_s": round(count * row["warm_wall_us"] / 1e6, 1),
               "warm_cpu_s": round(count * row["warm_cpu_us"] / 1e6, 1)}
        threaded = f"cold_{filecheck.WORKERS}_threads_wall_us"
        if threaded in row:  # threads as the validator runs them (a few hundred files do not amortize starting
            # 16 threads: then the one-thread figure is the better per-file cost)
            est["cold_s"] = round(count * min(row[threaded], row["cold_wall_us"]) / 1e6, 1)
        out["estimate_full_nuscenes_s"][name] = est
    per_model = {"fbocc": ["jpeg markers", "lidar size", "Occ3D zip directory", "info path (fbocc)"],
                 "bevdepth": ["jpeg markers", "lidar size", "depth_gt size", "info path (bevdepth)"]}
    for model, names in per_model.items():
        est = out["estimate_full_nuscenes_s"]
        if all(n in est for n in names):
            out["estimate_full_nuscenes_s"][f"{model} total"] = {
                key: round(sum(est[n].get(key, est[n]["warm_s"]) for n in names), 1)
                for key in ("warm_s", "warm_cpu_s", "cold_s")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
