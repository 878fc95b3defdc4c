"""The kit's ``run_cli`` for BEVDepth experiments (replaces ``bevdepth.exps.base_cli.run_cli`` at runtime).

Same command line as upstream (pytorch-lightning Trainer arguments, ``-e/--evaluate``, ``-p/--predict``,
``-b/--batch_size_per_device``, ``--seed``, ``--ckpt_path`` and upstream's Trainer defaults: 24 epochs,
gradient clip 5, no validation during fit, fp16 AMP), adapted to pytorch-lightning 1.9 and to the
device:

- the device is the run's (:func:`bevkit.device.run_device`: ``bevdepth/run.py --device``, else
  ``$BEVKIT_DEVICE``, else the best available), resolved once when the kit was activated. Devices per node
  come from torchrun (``LOCAL_WORLD_SIZE``) unless ``--devices``/``--gpus`` say otherwise.
- NPU: :mod:`bevkit.lightning_npu` (accelerator, DDP over hccl, NPU AMP + torch_npu grad scaler).
  CUDA: Lightning's own GPU accelerator, DDP over nccl, native AMP. CPU: DDP over gloo; precision 32 by
  default (``--precision bf16`` for CPU autocast; upstream's 16 means bf16 on CPU).
- Upstream scales the learning rate by ``gpus``: the kit passes the world size, so lr = 2e-4/64 x
  batch per device x world size on every device (2e-4 for 8 x 8).
- ``--weight_decay`` (default: upstream's 1e-7), ``--data_root`` (default: upstream's data/nuScenes),
  ``--nusc_version`` for evaluation.
- Steps are recorded by :class:`bevkit.timing.lightning.BevkitTimingCallback` (``steps.jsonl`` in
  ``$BEVKIT_RUN_DIR``), which also stops after ``$BEVKIT_MAX_STEPS``.
"""
from __future__ import annotations

import os
import warnings
from argparse import ArgumentParser
from typing import List, Optional, Sequence

from bevkit import env
from bevkit.compat import prepare_imports
from bevkit.device import RunDevice, run_device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def build_parser(exp_name: str, epochs: int = 24) -> ArgumentParser:
    prepare_imports()  # Lightning imports torchvision
    import pytorch_lightning as pl

    parser = ArgumentParser(prog=f"bevdepth/run.py {exp_name}.py", add_help=True)
    parser = pl.Trainer.add_argparse_args(parser)
    parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true",
                        help="evaluate the checkpoint (--ckpt_path) on the validation set")
    parser.add_argument("-p", "--predict", dest="predict", action="store_true",
                        help="predict on the test set and write results_nusc.json")
    parser.add_argument("-b", "--batch_size_per_device", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed for initializing training")
    parser.add_argument("--ckpt_path", type=str,
                        help="evaluate these weights (-e), or resume training from this checkpoint")
    parser.add_argument("--load_weights", default=None,
                        help="start training from these weights (fresh optimizer and counters)")
    parser.add_argument("--data_root", default=env.get("BEVKIT_DATA_ROOT") or "data/nuScenes",
                        help="nuScenes data root with the info pkls (default: $BEVKIT_DATA_ROOT or "
                             "data/nuScenes)")
    parser.add_argument("--weight_decay", type=float, default=None,
                        help="AdamW weight decay (default: upstream's 1e-7)")
    parser.add_argument("--evaluate_after_fit", action="store_true",
                        help="after training, evaluate the final weights on the validation set (smoke runs)")
    parser.add_argument("--nusc_version", default=None,
                        help="nuScenes version folder for evaluation (default v1.0-trainval)")
    parser.set_defaults(profiler="simple", deterministic=False, max_epochs=epochs,
                        num_sanity_val_steps=0, gradient_clip_val=5, limit_val_batches=0,
                        enable_checkpointing=True, precision=None,
                        default_root_dir=env.get("BEVKIT_RUN_DIR") or os.path.join("./outputs/", exp_name))
    return parser


def trainer_setup(device, args) -> dict:
    """Trainer keyword arguments (accelerator, devices, strategy, precision, plugins) for ``device`` (a
    :class:`~bevkit.device.RunDevice` or a device type)."""
    from pytorch_lightning.strategies import DDPStrategy

    device = RunDevice.of(device)
    devices = args.devices or args.gpus or _env_int("LOCAL_WORLD_SIZE", 1)
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else devices
    num_nodes = args.num_nodes if args.num_nodes not in (None, 1) else _nodes_from_torchrun()
    precision = args.precision
    kwargs = dict(devices=devices, num_nodes=num_nodes, gpus=None)
    ddp = isinstance(devices, int) and devices * num_nodes > 1 or num_nodes > 1
    if device.kind == "npu":
        from bevkit.lightning_npu import NPUAccelerator, NPUDDPStrategy, NPUMixedPrecisionPlugin

        precision = 16 if precision is None else precision
        kwargs.update(accelerator=NPUAccelerator(),
                      strategy=NPUDDPStrategy(find_unused_parameters=False) if ddp else
                      _single_npu_strategy())
        if str(precision) == "16":
            kwargs["plugins"] = [NPUMixedPrecisionPlugin()]
            precision = 32  # the plugin does the mixed precision; Lightning must not add its own
    elif device.kind == "cuda":
        precision = 16 if precision is None else precision
        kwargs.update(accelerator="gpu", strategy=DDPStrategy(find_unused_parameters=False) if ddp else None)
    else:
        if precision is None:
            precision = 32
        elif str(precision) == "16":
            warnings.warn("CPU has no fp16 autocast: --precision 16 means bf16 on CPU")
            precision = "bf16"
        kwargs.update(accelerator="cpu",
                      strategy=DDPStrategy(process_group_backend=device.dist_backend, find_unused_parameters=False)
                      if ddp else None)
    kwargs["precision"] = precision
    if kwargs.get("strategy") is None:
        kwargs.pop("strategy")
    return kwargs


def _nodes_from_torchrun() -> int:
    """Nodes of this torchrun job (WORLD_SIZE / LOCAL_WORLD_SIZE); 1 outside torchrun."""
    world, local = _env_int("WORLD_SIZE", 0), _env_int("LOCAL_WORLD_SIZE", 0)
    return max(1, world // local) if world and local else 1


def _single_npu_strategy():
    from bevkit.lightning_npu import SingleNPUStrategy

    return SingleNPUStrategy()


def world_size_of(kwargs: dict) -> int:
    devices = kwargs.get("devices")
    per_node = devices if isinstance(devices, int) else 1
    return per_node * (kwargs.get("num_nodes") or 1)


def run_cli(model_class, exp_name: str = "base_exp", use_ema: bool = False,
            extra_trainer_config_args: Optional[dict] = None, argv: Optional[Sequence[str]] = None):
    """Drop-in for upstream ``run_cli`` (same signature): parses the experiment's command line (``sys.argv``,
    set by bevdepth/run.py) like upstream does, on the run's device."""
    import pytorch_lightning as pl

    from bevkit.models.bevdepth.callbacks import BevkitResumeState, RunFolderCheckpoint, resumable_ema
    from bevkit.timing.lightning import BevkitTimingCallback

    extra = extra_trainer_config_args or {}
    parser = build_parser(exp_name, extra.get("epochs", 24))
    args = parser.parse_args(None if argv is None else list(argv))
    device = run_device()
    if args.seed is not None:
        pl.seed_everything(args.seed)
    trainer_kwargs = trainer_setup(device, args)
    # upstream: lr = 2e-4 / 64 * batch_per_device * gpus -> the global batch decides it
    model_kwargs = dict(vars(args), gpus=world_size_of(trainer_kwargs))
    model_kwargs.pop("evaluate_after_fit")
    model_kwargs.pop("load_weights")
    if model_kwargs.get("nusc_version") is None:
        model_kwargs.pop("nusc_version")
    model = model_class(**model_kwargs)

    for path in (args.ckpt_path, args.load_weights):
        verify(model, path)
    if args.load_weights:
        model.load_state_dict(_state_dict(args.load_weights), strict=False)  # verified: allow-listed gaps only

    # the runner knows the batch: each step record counts batch per device x world size samples
    callbacks: List = [BevkitTimingCallback(samples_per_device=args.batch_size_per_device),
                       BevkitResumeState("bevdepth")]
    if args.enable_checkpointing is not False:
        callbacks.append(RunFolderCheckpoint())  # Lightning's default, minus deleting other runs' files
    if use_ema:
        from bevdepth.callbacks.ema import EMACallback

        callbacks.append(resumable_ema(EMACallback)(len(model.train_dataloader().dataset) * args.max_epochs))
    trainer = pl.Trainer.from_argparse_args(args, callbacks=callbacks, **trainer_kwargs)
    if args.evaluate:
        if not args.ckpt_path:
            parser.error("-e/--evaluate needs --ckpt_path CKPT")
        trainer.test(model, ckpt_path=args.ckpt_path)
    elif args.predict:
        _predict(trainer, model, args.ckpt_path)
    else:
        trainer.fit(model, ckpt_path=args.ckpt_path)
        if args.evaluate_after_fit:
            trainer.test(model)
    return trainer


def _state_dict(path):
    from bevkit import torch_load

    ckpt = torch_load.load(path, map_location="cpu")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def verify(model, path: Optional[str]) -> None:
    """The checkpoint the launcher checked (``BEVKIT_CHECKPOINT``), compared key by key with the built model
    before anything runs (Lightning would fail mid-setup; starting weights would load with gaps)."""
    checked = env.get("BEVKIT_CHECKPOINT")
    if not path or not checked or os.path.abspath(path) != os.path.abspath(checked):
        return
    from bevkit import torch_load
    from bevkit.checkpoint_check import compare, inspect
    from bevkit.models.bevdepth import CHECKPOINT_FORMAT

    found = inspect(torch_load.load(path, mmap=True), path)
    compare({k: tuple(v.shape) for k, v in model.state_dict().items()}, found.keys, CHECKPOINT_FORMAT, path)


def _predict(trainer, model, ckpt_path):
    from bevdepth.utils.torch_dist import all_gather_object, get_rank, synchronize

    outputs = trainer.predict(model, ckpt_path=ckpt_path)
    results, metas = [], []
    for batch in outputs:
        for sample in batch:
            results.append(sample[:3])
            metas.append(sample[3])
    synchronize()
    length = len(model.test_dataloader().dataset)
    results = sum(map(list, zip(*all_gather_object(results))), [])[:length]
    metas = sum(map(list, zip(*all_gather_object(metas))), [])[:length]
    if get_rank() == 0:
        model.evaluator._format_bbox(results, metas, os.path.dirname(ckpt_path or model.default_root_dir))
