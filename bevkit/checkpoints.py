"""Checkpoints: what a recipe loads, where the kit looks for it (one order), how it is verified, and which
places the kit trusts.

Search order, for every model and tool: an explicit folder (an option such as ``--ckpt-dir`` or FB-OCC's
``--cfg-options ckpt_dir=DIR``), then ``$BEVKIT_CKPT_DIR``, then ``DATA_ROOT/ckpts``, then (files torchvision
publishes) the torch hub cache. Files are verified by sha256: a full digest when one is known, the 8-digit
prefix torchvision puts in its file names, or the digest recorded in the folder's ``SHA256SUMS`` the first
time a file without a published checksum is verified.

Trust (:func:`trusted_place`): ``torch.load`` of a file that does not load with ``weights_only=True`` unpickles
arbitrary objects, i.e. can run code written into the file. The kit loads such a file only from a place you
filled yourself: a run folder of the kit (a folder whose ``launch.json`` the launcher wrote), a checkpoint folder
of the search order above (``$BEVKIT_CKPT_DIR``, ``DATA_ROOT/ckpts``), or anywhere with ``--trust-checkpoint``
(``BEVKIT_TRUST_CHECKPOINT=1``). No torch here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from bevkit import env
from bevkit.provenance import sha256

SUMS_FILE = "SHA256SUMS"
PathLike = Union[str, Path]


@dataclass(frozen=True)
class Checkpoint:
    file: str
    url: str
    sha256: Optional[str] = None          # full digest, when published
    sha256_prefix: Optional[str] = None   # torchvision's file-name hash prefix
    in_torch_hub: bool = False            # torchvision weights may already sit in the torch hub cache


#: torchvision's ImageNet ResNet-50 (both models' image backbone starts from it).
RESNET50 = Checkpoint("resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                      sha256_prefix="0676ba61", in_torch_hub=True)


def folders(data_root: Optional[PathLike] = None, explicit: Optional[PathLike] = None) -> List[Path]:
    """Checkpoint folders in search order: explicit, $BEVKIT_CKPT_DIR, DATA_ROOT/ckpts."""
    found = [Path(p) for p in (explicit, env.get("BEVKIT_CKPT_DIR")) if p]
    if data_root:
        found.append(Path(data_root) / "ckpts")
    return list(dict.fromkeys(found))


def folder(data_root: Optional[PathLike] = None, explicit: Optional[PathLike] = None) -> Optional[Path]:
    """The checkpoint folder of a run: the explicit one, else the first existing one of :func:`folders`."""
    if explicit:
        return Path(explicit)
    return next((f for f in folders(data_root) if f.is_dir()), None)


def torch_hub_folder() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def candidates(ckpt: Checkpoint, data_root: Optional[PathLike] = None,
               explicit: Optional[PathLike] = None) -> List[Path]:
    places = [f / ckpt.file for f in folders(data_root, explicit)]
    if ckpt.in_torch_hub:
        places.append(torch_hub_folder() / ckpt.file)
    return places


def _read_sums(where: Path) -> Dict[str, str]:
    sums: Dict[str, str] = {}
    path = where / SUMS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0]
    return sums


def verify(ckpt: Checkpoint, path: Path, recorded: Optional[str] = None) -> Optional[str]:
    """Why ``path`` is not ``ckpt`` (one line with the fix), or None when it verifies."""
    digest = sha256(path)
    expected = ckpt.sha256 or recorded
    if expected and digest != expected:
        return (f"{path}: sha256 {digest} does not match the recorded {expected}; download it again from "
                f"{ckpt.url}")
    if ckpt.sha256_prefix and not digest.startswith(ckpt.sha256_prefix):
        return (f"{path}: sha256 {digest} does not start with {ckpt.sha256_prefix} (the hash in its file name): "
                f"the file is corrupt or not the published release; download it again from {ckpt.url}")
    return None


def locate(ckpt: Checkpoint, data_root: Optional[PathLike] = None, explicit: Optional[PathLike] = None,
           fallback: str = "") -> Path:
    """The first verified copy of ``ckpt`` in search order; FileNotFoundError (listing where it was looked
    for, and ``fallback``) or ValueError (a corrupt file) otherwise."""
    places = candidates(ckpt, data_root, explicit)
    for place in places:
        if place.is_file():
            problem = verify(ckpt, place, _read_sums(place.parent).get(ckpt.file))
            if problem:
                raise ValueError(problem)
            return place
    raise FileNotFoundError(
        f"{ckpt.file} not found; there is no network download here. Put it ({ckpt.url}) in one of: "
        + "; ".join(str(p) for p in places) + " (an explicit folder, BEVKIT_CKPT_DIR, <data root>/ckpts"
        + (" or the torch hub cache" if ckpt.in_torch_hub else "") + ")" + (f", {fallback}" if fallback else "")
        + ".")


def check_folder(needed: Iterable[Checkpoint], where: Path, record: bool = True,
                 used_as: Optional[Dict[str, str]] = None) -> List[str]:
    """Problems with ``needed`` in one folder (missing, corrupt); records the sha256 of files without a
    published checksum in SHA256SUMS the first time they verify. Empty when all are present and verified."""
    used_as = used_as or {}
    problems = []
    sums = _read_sums(where)
    new_sums = dict(sums)
    for ckpt in needed:
        path = where / ckpt.file
        role = f" ({used_as[ckpt.file]})" if ckpt.file in used_as else ""
        if not path.is_file():
            problems.append(f"missing checkpoint {path}{role}: download it with\n"
                            f"    mkdir -p {where} && wget -O {path} {ckpt.url}\n"
                            f"  or point the run elsewhere with --cfg-options ckpt_dir=DIR")
            continue
        problem = verify(ckpt, path, sums.get(ckpt.file))
        if problem:
            problems.append(problem)
        else:
            new_sums[ckpt.file] = sha256(path)
    if record and new_sums != sums:  # only files that passed are recorded
        (where / SUMS_FILE).write_text("".join(f"{d}  {n}\n" for n, d in sorted(new_sums.items())))
    return problems


def relative_to_folder(name: str) -> bool:
    """True for a checkpoint reference a config leaves relative (upstream's ``ckpts/...``), not a URL or
    an absolute path."""
    return not name.startswith(("torchvision://", "open-mmlab://", "http://", "https://")) and \
        not os.path.isabs(name)


# ------------------------------------------------------------------------------------------------- trust
RUN_RECORD = "launch.json"  # written by the launcher into every run folder


def run_folder_of(path: PathLike) -> Optional[Path]:
    """The kit run folder holding ``path`` (itself or a parent): a folder with the ``launch.json`` the launcher
    wrote there (its recorded run_dir is that folder); None when there is none."""
    start = Path(os.path.abspath(str(path)))
    for folder in [start] + list(start.parents):
        record = folder / RUN_RECORD
        if not record.is_file():
            continue
        try:
            recorded = json.loads(record.read_text(encoding="utf-8")).get("request", {}).get("run_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded and os.path.abspath(recorded) == str(folder):
            return folder
    return None


def _inside(path: Path, folder: Path) -> bool:
    for a in {os.path.abspath(str(path)), os.path.realpath(str(path))}:
        for b in {os.path.abspath(str(folder)), os.path.realpath(str(folder))}:
            if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
                return True
    return False


def trusted_place(path: PathLike, data_root: Optional[PathLike] = None, environ=None) -> Optional[str]:
    """Why the kit may unpickle ``path`` in full (one phrase), or None when it is not in a trusted place:
    ``BEVKIT_TRUST_CHECKPOINT=1`` (``--trust-checkpoint``), a kit run folder, or a checkpoint folder
    (``$BEVKIT_CKPT_DIR``, ``DATA_ROOT/ckpts``; DATA_ROOT defaults to ``$BEVKIT_DATA_ROOT``)."""
    if env.get("BEVKIT_TRUST_CHECKPOINT", environ) == "1":
        return "--trust-checkpoint was given"
    run = run_folder_of(path)
    if run is not None:
        return f"it is in the kit run folder {run}"
    data_root = data_root or env.get("BEVKIT_DATA_ROOT", environ)
    places = [Path(p) for p in (env.get("BEVKIT_CKPT_DIR", environ),) if p]
    places += [Path(data_root) / "ckpts"] if data_root else []
    for place in places:
        if _inside(Path(path), place):
            return f"it is in the checkpoint folder {place}"
    return None
