"""Load samples of a model's training set through the upstream dataset, with the kit's runtime active (a child
process of test/test_bad_inputs.py: FB-BEV's mmdet3d and BEVDepth's must not share a process).

    python test/assets/dataset_item.py {fbocc,bevdepth} DATA_ROOT INDEX [INDEX ...] [--cut CAMERA]

FB-OCC: the training set of the kit's tiny smoke config (FBBEV_ROOT = the checkout), data root given as the
launcher gives it (BEVKIT_DATA_ROOT). BEVDepth: the training set of the kit's tiny smoke experiment (BEVDEPTH_SRC =
the checkout). Prints one JSON line: {"items": [{"index", "token", "image_sum"}...]} or {"error", "message"};
with ``--cut CAMERA`` also {"cut": the image of CAMERA of the last index, cut to half its size in place, "after_cut":
what loading that sample again gives} (one process: the upstream imports take most of the time).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def fbocc_dataset(root: str):
    os.environ["BEVKIT_DATA_ROOT"] = root
    from bevkit.models.fbocc import runtime

    runtime.activate(str(Path(os.environ["FBBEV_ROOT"]) / "tools" / "train.py"), device="cpu")
    from mmcv import Config
    from mmdet3d.datasets import build_dataset

    from bevkit.models.fbocc.config import finalize

    cfg = Config.fromfile(str(REPO / "fbocc/configs/fbocc_tiny_smoke.py"))
    finalize(cfg)
    dataset = build_dataset(cfg.data.train)
    return (dataset, lambda i: dataset.data_infos[i]["token"], lambda item: _first_tensor(item["img_inputs"]),
            lambda i, cam: dataset.data_infos[i]["cams"][cam]["data_path"])


def bevdepth_dataset(root: str):
    from bevkit.models.bevdepth import runtime

    runtime.activate(device="cpu")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_exp", REPO / "bevdepth/configs/bev_depth_tiny_smoke.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    model = exp.BEVDepthLightningModel(data_root=root, batch_size_per_device=1, gpus=1)
    dataset = model.train_dataloader().dataset
    return (dataset, lambda i: dataset.infos[i]["sample_token"], _first_tensor,
            lambda i, cam: os.path.join(root, dataset.infos[i]["cam_infos"][cam]["filename"]))


def _first_tensor(x):
    """The images of a sample: the first tensor inside mmcv DataContainers / tuples."""
    while not hasattr(x, "double"):
        x = getattr(x, "data", x)
        x = x[0] if isinstance(x, (tuple, list)) else x
    return x


def _load(dataset, token, image, indices) -> dict:
    items = []
    try:
        for i in indices:
            item = dataset[i]
            items.append({"index": i, "token": token(i), "image_sum": float(image(item).double().sum())})
    except Exception as e:  # the test asserts on the message
        return {"error": type(e).__name__, "message": str(e)}
    return {"items": items}


def main(argv) -> int:
    cut = None
    if "--cut" in argv:
        at = argv.index("--cut")
        cut, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    model, root, indices = argv[0], argv[1], [int(i) for i in argv[2:]]
    dataset, token, image, camera_file = {"fbocc": fbocc_dataset, "bevdepth": bevdepth_dataset}[model](root)
    out = _load(dataset, token, image, indices)
    if cut and "items" in out:
        path = Path(camera_file(indices[-1], cut))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        out.update(cut=str(path), after_cut=_load(dataset, token, image, indices[-1:]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
