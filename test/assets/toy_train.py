"""Tiny pure-PyTorch DDP regression trained by the launcher tests (gloo on CPU; no upstream needed).

Uses bevkit.timing.StepRecorder like the real hooks do: one record per optimizer step on rank 0, stop at
BEVKIT_MAX_STEPS. Options: --steps N (upper bound), --fail-at N (exit 3 after step N, to test failures),
--sleep S (seconds of extra work per step, to make step times measurable), --bad-checkpoint (every rank
raises the kit's one-line CheckpointError before training, as a checkpoint that does not fit the model would).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bevkit.results import write_metrics
from bevkit.timing import StepRecorder


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--fail-at", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--bad-checkpoint", action="store_true")
    args = p.parse_args()
    batch = int(os.environ.get("BEVKIT_SAMPLES_PER_DEVICE", "4"))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.bad_checkpoint:
        from bevkit.errors import CheckpointError

        raise CheckpointError("toy.pth does not fit the Toy model of the config: keys 1 missing (e.g. w); "
                              "pass the config it was trained with (--config)")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(123))
    data = torch.Generator().manual_seed(rank)
    recorder = StepRecorder()
    recorder.start()
    loss = torch.zeros(())
    for step in range(1, args.steps + 1):
        x = torch.randn(batch, 16, generator=data)
        y = x @ w_true
        recorder.step_begin()
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.sleep:
            time.sleep(args.sleep)
        if args.fail_at is not None and step >= args.fail_at:
            print(f"rank {rank}: failing on purpose after step {step}", flush=True)
            raise SystemExit(3)
        if recorder.step_end(loss=loss, losses={"mse": loss}, lr=opt.param_groups[0]["lr"]):
            break
    recorder.close()
    write_metrics({"mse_final": loss.item()})  # rank 0 only (write_metrics checks RANK)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done after {recorder.steps} steps", flush=True)


if __name__ == "__main__":
    main()
