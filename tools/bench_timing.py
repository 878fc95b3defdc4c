#!/usr/bin/env python3
"""Overhead of the per-step timing (bevkit.timing) on CPU: prints microseconds per step.

    python tools/bench_timing.py [--steps 5000] [--train-steps 300]

1. StepRecorder.step_begin + step_end alone, with the losses as Python floats and as 0-d tensors
   (5 loss terms + total, as FB-OCC logs), writing steps.jsonl to a temporary folder.
2. The mmcv hook and the Lightning callback around the recorder (fake runner / trainer objects), when
   mmcv / pytorch-lightning import.
3. A small MLP training loop (batch 32) with and without the recorder: the difference of the median
   step times.

On CPU the device synchronization is a no-op; on NPU/CUDA the recorder additionally waits for the
device once per step on rank 0 (the losses' .item() calls of the training loops already do).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bevkit.timing import StepRecorder  # noqa: E402


def per_step_us(fn, steps: int, repeats: int = 5) -> float:
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(best)


def bench_recorder(steps: int, folder: str) -> dict:
    out = {}
    rec = StepRecorder(run_dir=folder, device="cpu", rank=0, world_size=8, samples_per_device=4)
    rec.start()
    floats = {f"loss_{i}": 0.1 * i for i in range(5)}

    def with_floats():
        rec.step_begin()
        rec.step_end(loss=1.0, losses=floats, lr=2e-4)

    out["recorder, float losses"] = per_step_us(with_floats, steps)
    tensors = {f"loss_{i}": torch.tensor(0.1 * i) for i in range(5)}
    total = torch.tensor(1.0)

    def with_tensors():
        rec.step_begin()
        rec.step_end(loss=total, losses=tensors, lr=2e-4)

    out["recorder, 0-d tensor losses"] = per_step_us(with_tensors, steps)
    other = StepRecorder(run_dir=folder, device="cpu", rank=1, world_size=8)
    other.start()

    def non_zero_rank():
        other.step_begin()
        other.step_end(loss=total, losses=tensors, lr=2e-4)

    out["recorder on ranks != 0"] = per_step_us(non_zero_rank, steps)
    rec.close()
    return out


def bench_adapters(steps: int, folder: str) -> dict:
    out = {}
    os.environ["BEVKIT_RUN_DIR"] = folder
    try:
        from bevkit.compat import prepare_imports

        prepare_imports()  # torchvision shim (mmcv.runner and torchmetrics import torchvision)
        try:
            from bevkit.timing.mmcv_hook import BevkitTimingHook
        except ImportError as e:
            out["mmcv hook"] = f"skipped ({e})"
        else:
            hook = BevkitTimingHook()
            runner = types.SimpleNamespace(rank=0, world_size=8, iter=0, epoch=0, _max_iters=10 ** 9,
                                           outputs={"log_vars": {**{f"loss_{i}": 0.1 * i for i in range(5)}, "loss": 1.0},
                                                    "num_samples": 4},
                                           current_lr=lambda: [2e-4], logger=None)
            hook.before_run(runner)

            def mmcv_step():
                hook.before_train_iter(runner)
                hook.after_train_iter(runner)

            out["mmcv hook"] = per_step_us(mmcv_step, steps)
            hook.after_run(runner)
        try:
            from bevkit.timing.lightning import BevkitTimingCallback
        except ImportError as e:
            out["Lightning callback"] = f"skipped ({e})"
        else:
            cb = BevkitTimingCallback()
            opt = types.SimpleNamespace(param_groups=[{"lr": 2e-4}])
            trainer = types.SimpleNamespace(global_rank=0, world_size=8, optimizers=[opt], current_epoch=0,
                                            global_step=0, should_stop=False,
                                            callback_metrics={"detection_loss": torch.tensor(1.0),
                                                              "depth_loss": torch.tensor(0.5)})
            cb.on_train_start(trainer, None)
            outputs = {"loss": torch.tensor(1.5)}

            def pl_step():
                cb.on_train_batch_start(trainer, None, None, 0)
                cb.on_train_batch_end(trainer, None, outputs, None, 0)

            out["Lightning callback"] = per_step_us(pl_step, steps)
            cb.on_train_end(trainer, None)
    finally:
        os.environ.pop("BEVKIT_RUN_DIR", None)
    return out


def bench_training(steps: int, folder: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))

    def train(recorder):
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            if recorder:
                recorder.step_begin()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if recorder:
                recorder.step_end(loss=loss.detach(), losses={"ce": loss.detach()}, lr=0.01)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[steps // 10:]) * 1e6

    train(None)  # warm the allocator and kernels
    rec = StepRecorder(run_dir=folder, device="cpu", rank=0, world_size=1, samples_per_device=32)
    rec.start()
    pairs = [(train(None), train(rec)) for _ in range(3)]  # interleaved: machine noise hits both
    rec.close()
    base = statistics.median(p[0] for p in pairs)
    timed = statistics.median(p[1] for p in pairs)
    return {"MLP step without recorder": base, "MLP step with recorder": timed,
            "difference": timed - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000, help="calls per micro-benchmark repeat")
    p.add_argument("--train-steps", type=int, default=300, help="steps per training-loop measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), 1 thread")
    with tempfile.TemporaryDirectory() as folder:
        for name, value in {**bench_recorder(args.steps, folder), **bench_adapters(args.steps, folder),
                            **bench_training(args.train_steps, folder)}.items():
            print(f"{name:32s} {value:10.1f} us/step" if isinstance(value, float) else f"{name:32s} {value}")


if __name__ == "__main__":
    main()
