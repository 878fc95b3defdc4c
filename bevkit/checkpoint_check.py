"""Checkpoints checked before use: readable, of the right model, complete (issue 12).

Before any training or evaluation starts, the launcher runs ``python -m bevkit.checkpoint_check`` on the
checkpoint it was given (``--checkpoint`` for evaluation or as starting weights, the newest checkpoint of the
``--resume`` run): one line and exit code 3 (:class:`bevkit.errors.CheckpointError`) instead of a worker
traceback or, worse, an evaluation of random weights. What it checks:

1. readable: ``torch.load(weights_only=True, mmap=True)`` through :func:`bevkit.torch_load.load` (a truncated
   file has no zip directory; a file that needs full unpickling must lie in a trusted place);
2. the right model: the kit's metadata in the file (``bevkit.model``), else the top-level modules of its state
   dict against each registered model's :class:`~bevkit.registry.CheckpointFormat` (the model's own knowledge);
   the message says what the file is ("... is a BEVDepth Lightning checkpoint, not an FB-OCC one");
3. complete: every module the model always has is present; resuming also needs the training state
   (optimizer, counters) of the model's own framework.

The exact check (every key and shape against the model built from the run's config, minus the model's
documented allow-list) needs the model, so it runs inside the training process right after the model is built
and before the first step (:func:`compare`; FB-OCC: patch 'fbocc-checkpoint-complete', BEVDepth: the kit's
CLI), ending in the same kind of one line.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from bevkit.errors import CheckpointError
from bevkit.registry import CheckpointFormat, ModelSpec, all_specs, get_spec

PURPOSES = {"eval": "eval", "init": "--checkpoint (starting weights)", "resume": "--resume"}
KIT_KEY = "bevkit"  # mmcv: checkpoint['meta']['bevkit']; Lightning: the kit callback's state
WHAT = {"mmcv": "mmcv checkpoint", "lightning": "Lightning checkpoint", "ema": "EMA weights file",
        "state_dict": "state dict"}


@dataclass
class Found:
    """What a checkpoint file holds."""

    path: Path
    framework: str                                   # a key of WHAT
    keys: Dict[str, Tuple[int, ...]] = field(default_factory=dict)   # state dict: key -> shape
    step: Optional[int] = None                       # optimizer steps done (mmcv iterations, Lightning global step)
    epoch: Optional[int] = None
    resumable: bool = False                          # optimizer state and counters of a training checkpoint
    kit_model: Optional[str] = None                  # the model the kit recorded when it wrote the file

    def summary(self) -> dict:
        return {"path": str(self.path), "framework": self.framework, "step": self.step, "epoch": self.epoch,
                "tensors": len(self.keys), "resumable": self.resumable}


# ------------------------------------------------------------------------------------------------ reading
def read(path: Path, data_root: Optional[str] = None):
    """The checkpoint's object (tensors memory-mapped), or CheckpointError naming the file and the fix."""
    from bevkit import torch_load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        try:
            return torch_load.load(path, mmap=True, data_root=data_root)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch_load.load(path, data_root=data_root)  # the pre-1.6 format cannot be memory-mapped
    except CheckpointError:
        raise
    except Exception as e:  # zip directory missing (truncated), not a pickle, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} ({path.stat().st_size} bytes) is not a readable checkpoint ({reason[:160]}): "
                              "it is truncated or not a torch file; copy it again from where it was written") from None


def _shapes(state: Mapping) -> Dict[str, Tuple[int, ...]]:
    return {str(k): tuple(getattr(v, "shape", ())) for k, v in state.items() if hasattr(v, "shape")}


def inspect(obj, path: Path) -> Found:
    """Classify a loaded checkpoint object."""
    path = Path(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint (a dict with a state dict)")
    state = obj.get("state_dict")
    if "pytorch-lightning_version" in obj and isinstance(state, Mapping):
        kit = next((v for k, v in (obj.get("callbacks") or {}).items() if str(k).startswith("BevkitResumeState")),
                   None) or {}
        return Found(path, "lightning", _shapes(state), step=obj.get("global_step"), epoch=obj.get("epoch"),
                     resumable="optimizer_states" in obj and "loops" in obj, kit_model=kit.get("model"))
    if isinstance(state, Mapping) and isinstance(obj.get("meta"), Mapping):
        meta = obj["meta"]
        kit = meta.get(KIT_KEY) or {}
        step = kit.get("completed_iters")
        if step is None and isinstance(meta.get("iter"), int):
            step = meta["iter"] + 1  # mmcv's IterBasedRunner records the 0-based iteration it saved in
        return Found(path, "mmcv", _shapes(state), step=step, epoch=meta.get("epoch"),
                     resumable="optimizer" in obj, kit_model=kit.get("model"))
    if isinstance(state, Mapping):
        return Found(path, "ema", _shapes(state), step=obj.get("iter", obj.get("global_step")),
                     epoch=obj.get("epoch"))
    shapes = _shapes(obj)
    if shapes and len(shapes) == len(obj):
        return Found(path, "state_dict", shapes)
    raise CheckpointError(f"{path} holds a dict with keys {', '.join(map(str, list(obj)[:6]))}, but no state dict: "
                          "not a model checkpoint")


# ------------------------------------------------------------------------------------------- which model
def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key  # DDP-wrapped saves


def modules_of(found: Found, fmt: CheckpointFormat) -> Tuple[set, int]:
    """(top-level modules of the state dict after the model's key prefix, keys without that prefix)."""
    tops, outside = set(), 0
    for key in found.keys:
        key = _strip(key)
        if fmt.key_prefix:
            if not key.startswith(fmt.key_prefix):
                outside += 1
                continue
            key = key[len(fmt.key_prefix):]
        tops.add(key.split(".", 1)[0])
    return tops, outside


def belongs_to(found: Found, spec: ModelSpec) -> bool:
    fmt = spec.checkpoint_format
    if fmt is None:
        return False
    if found.kit_model is not None:
        return found.kit_model == spec.name
    tops, outside = modules_of(found, fmt)
    return not outside and set(fmt.modules) <= tops <= set(fmt.modules) | set(fmt.optional_modules)


def owner(found: Found, specs: Optional[Sequence[ModelSpec]] = None) -> Optional[ModelSpec]:
    return next((s for s in (specs or all_specs()) if belongs_to(found, s)), None)


def describe(found: Found, model: Optional[ModelSpec]) -> str:
    """'a BEVDepth Lightning checkpoint (epoch 6, step 7)', 'a state dict of 320 tensors (conv1, layer1, ...)'."""
    what = WHAT[found.framework]
    where = []
    if found.epoch is not None:
        where.append(f"epoch {found.epoch}")
    if found.step is not None:
        where.append(f"step {found.step}")
    counters = f" ({', '.join(where)})" if where else ""
    if model is not None:
        title = model.checkpoint_format.title
        return f"{'an' if title[0] in 'AEFHILMNORSX' else 'a'} {title} {what}{counters}"
    tops = sorted({_strip(k).split(".", 1)[0] for k in found.keys})
    shown = ", ".join(tops[:5]) + (", ..." if len(tops) > 5 else "")
    return f"{'an' if what[0] in 'aeiou' else 'a'} {what} of {len(found.keys)} tensors ({shown}) of no model the kit knows"


# -------------------------------------------------------------------------------------------------- check
def check(spec: ModelSpec, path: Path, purpose: str, data_root: Optional[str] = None,
          specs: Optional[Sequence[ModelSpec]] = None) -> Found:
    """Everything about ``path`` that can be checked without building the model; CheckpointError otherwise."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {sorted(PURPOSES)}, got {purpose!r}")
    fmt = spec.checkpoint_format
    head = f"{spec.name} {PURPOSES[purpose]}:"
    found = inspect(read(path, data_root), path)
    if fmt is None:
        return found
    if not belongs_to(found, spec):
        other = owner(found, specs)
        tops, outside = modules_of(found, fmt)
        missing = [m for m in fmt.modules if m not in tops]
        if other is None and not outside and missing and len(missing) < len(fmt.modules) \
                and tops <= set(fmt.modules) | set(fmt.optional_modules):
            raise CheckpointError(f"{head} {path} is an incomplete {fmt.title} {WHAT[found.framework]}: it has no "
                                  f"{', '.join(missing)} weights; use a checkpoint written by a {fmt.title} training")
        fix = f"it belongs to --model {other.name}" if other is not None else "it is no kit model's"
        raise CheckpointError(f"{head} {path} is {describe(found, other)}, not {describe_title(fmt)} one ({fix}; "
                              f"pass an {fmt.files})" if fmt.files else
                              f"{head} {path} is {describe(found, other)}, not {describe_title(fmt)} one ({fix})")
    if purpose == "resume" and (found.framework != fmt.framework or not found.resumable):
        raise CheckpointError(f"{head} {path} is {describe(found, spec)} without the training state (optimizer, "
                              f"counters) a resume needs; use a run folder's {fmt.framework} checkpoint, or "
                              "--checkpoint FILE to start a new training from these weights")
    return found


def describe_title(fmt: CheckpointFormat) -> str:
    return f"{'an' if fmt.title[0] in 'AEFHILMNORSX' else 'a'} {fmt.title}"


def _allowed(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def compare(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]],
            fmt: CheckpointFormat, path, config: Optional[str] = None) -> None:
    """The exact completeness check against the built model's state dict (key -> shape): keys missing from or
    extra in the checkpoint beyond ``fmt``'s allow-list, or of another shape, raise one CheckpointError."""
    found = {_strip(k): tuple(v) for k, v in found.items()}
    missing = [k for k in expected if k not in found and not _allowed(k, fmt.allow_missing)]
    unexpected = [k for k in found if k not in expected and not _allowed(k, fmt.allow_unexpected)]
    reshaped = [k for k in expected if k in found and tuple(expected[k]) != found[k]]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {list(found[k])} in the file, "
                     f"{list(expected[k])} in the model)")
    config = f" {config}" if config else ""
    raise CheckpointError(f"{path} does not fit the {fmt.title} model of the config{config}: keys "
                          + "; ".join(parts) + ". It was written for another config: pass that one with --config")


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bevkit.checkpoint_check",
                                description="Check a checkpoint before a launch uses it (one line on failure, "
                                            "exit 3); prints a JSON summary when it is fine.")
    p.add_argument("--model", required=True)
    p.add_argument("--purpose", required=True, choices=sorted(PURPOSES))
    p.add_argument("--data-root", default=None)
    p.add_argument("checkpoint", type=Path)
    args = p.parse_args(argv)
    try:
        found = check(get_spec(args.model), args.checkpoint, args.purpose, args.data_root)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(found.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
