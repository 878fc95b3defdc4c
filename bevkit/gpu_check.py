"""GPU check of the cuda profile: build, op parity and a few fp16 training steps, in minutes (``tools/gpu_check``).

On a machine with one NVIDIA GPU set up with ``bash setup.sh --profile cuda`` (upstreams checked out):

1. build: FB-BEV's ``bev_pool_v2_ext`` and BEVDepth's voxel pooling extensions, in place, exactly as setup.sh
   does (``bevkit.upstream.install(name, 'cuda')``; already built and unchanged: skipped);
2. ops (a child process, so a crashing kernel still leaves a summary): every ``bevkit.ops`` op on CUDA against
   the portable backend (on the CPU) and against the upstream / mmcv kernel called directly, forward and input
   gradients, with tolerances derived as in ``test/tolerance.py``; a kit call that fell back to its portable
   code instead of the kernel fails;
3. models: a few training steps of each model's tiny config through the public launcher (``tools/launch --mode
   smoke --device cuda``): FB-OCC through mmcv with ``fp16 = dict(loss_scale='dynamic')`` (Fp16OptimizerHook),
   MMDistributedDataParallel and grad_clip max_norm 5; BEVDepth through Lightning with precision 16,
   ``gradient_clip_val=5`` and the optimizer the kit builds on CUDA.

Prints one JSON document: ``{"passed", "seconds", "gpu", "torch", "cuda", "checks": [{"name", "phase", "pass",
"max_error", "tolerance", "seconds", "detail"}]}``. Exit status: 0 all passed, 1 a check failed, 2 bad
arguments, 3 no CUDA GPU (one line on stderr, no JSON).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from bevkit import REPO_ROOT

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
PHASES = ("build", "ops", "models")
MODELS = ("fbocc", "bevdepth")


def check(name: str, phase: str, passed: bool, seconds: float, max_error: Optional[float] = None,
          tolerance: Optional[float] = None, detail: str = "") -> Dict[str, object]:
    """One entry of the summary."""
    return {"name": name, "phase": phase, "pass": bool(passed), "max_error": max_error, "tolerance": tolerance,
            "seconds": round(float(seconds), 3), "detail": detail}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    p.add_argument("--models", default=",".join(MODELS), help="models for the models phase (default: both)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per model (default: the tiny smoke config's own, a dozen or fewer)")
    p.add_argument("--upstream-dir", type=Path, default=None,
                   help="folder with the FB-BEV and BEVDepth checkouts (default: as bevkit.upstream)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset for the training steps (default: the smoke runs' synthetic dataset)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--child", choices=("ops",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    args.models = [x for x in args.models.split(",") if x]
    bad = [x for x in args.phases if x not in PHASES] + [x for x in args.models if x not in MODELS]
    if bad:
        p.error(f"unknown {', '.join(bad)}: --phases takes {', '.join(PHASES)}; --models takes {', '.join(MODELS)}")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def cuda_status():
    """(available, description): is there a CUDA GPU torch can use?"""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install is "no CUDA" for this check
        return False, f"torch does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, (f"torch {torch.__version__} sees no CUDA GPU (built with CUDA {torch.version.cuda}; "
                       f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return True, torch.cuda.get_device_name(0)


def _tolerance_module():
    """test/tolerance.py: the one definition of derived tolerances (the kit's tests use it too)."""
    spec = importlib.util.spec_from_file_location("bevkit_tolerance", REPO_ROOT / "test" / "tolerance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------------- build


def build_phase(upstream_dir: Optional[Path]) -> List[Dict[str, object]]:
    from bevkit import upstream

    out = []
    for name in ("FB-BEV", "BEVDepth"):
        t0 = time.time()
        lines: List[str] = []
        try:
            upstream.install(name, "cuda", upstream.checkout_dir(name, upstream_dir), log=lines.append)
            out.append(check(f"build {name}", "build", True, time.time() - t0, detail="; ".join(lines)))
        except Exception as exc:  # noqa: BLE001 - reported, the other phases still run
            out.append(check(f"build {name}", "build", False, time.time() - t0,
                             detail=f"{type(exc).__name__}: {exc}; " + "; ".join(lines)))
    return out


# ------------------------------------------------------------------------------------------------------ ops


def ops_child(upstream_dir: Optional[Path], device: str = "cuda") -> List[Dict[str, object]]:
    """Runs in the child: every op on CUDA vs portable (CPU) vs the upstream kernel. (``device='cpu'`` only
    exercises this code on a machine without a GPU; its checks are then meaningless.)"""
    import logging

    import torch
    import torch.nn.functional as F

    from bevkit import compat, ops, upstream

    compat.prepare_imports()
    for name in ("BEVDepth", "FB-BEV"):  # FB-BEV first on sys.path: its mmdet3d; bevdepth.ops has no mmdet3d
        sys.path.insert(0, str(upstream.checkout_dir(name, upstream_dir)))
    tol = _tolerance_module()
    dev = torch.device(device)
    results: List[Dict[str, object]] = []

    class Fallbacks(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages: List[str] = []

        def emit(self, record):
            if "portable" in record.getMessage():
                self.messages.append(record.getMessage())

    handler = Fallbacks()
    logging.getLogger("bevkit.ops").addHandler(handler)
    logging.getLogger("bevkit.ops").setLevel(logging.INFO)

    def run(fn, tensors, device, backend, grad_seed=0):
        leaves = [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in tensors]
        with ops.force_backend(backend):
            out = fn(*leaves)
        wants = [t for t in leaves if t.requires_grad]
        grads = []
        if out.requires_grad and wants:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(device, out.dtype)
            grads = [x for x in torch.autograd.grad(out, wants, g, allow_unused=True)]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return [out.detach().float().cpu()] + [None if x is None else x.float().cpu() for x in grads]

    def worst(a, b, terms):
        """(error, tolerance) of the tensor pair with the largest error / tolerance ratio."""
        out = None
        for i, (x, y) in enumerate(zip(a, b)):
            if x is None or y is None or not x.numel():
                continue
            n, mag = terms[min(i, len(terms) - 1)]
            bound = tol.sum_atol(torch.float32, n, mag) + tol.eps(torch.float32) * float(x.abs().max())
            err = float((x - y).abs().max())
            if out is None or err / bound > out[0] / out[1]:
                out = (err, bound)
        return out or (0.0, float("inf"))

    def compare(name, kit_fn, upstream_fn, tensors, n_terms, magnitude=1.0, terms=None):
        """``terms``: (n_terms, magnitude) per compared tensor (output, then each input gradient); default the
        same for all."""
        terms = terms or [(n_terms, magnitude)]
        t0 = time.time()
        handler.messages.clear()
        try:
            kit = run(kit_fn, tensors, dev, None)
            fallbacks = list(handler.messages)
            portable = run(kit_fn, tensors, "cpu", "portable")
            theirs = run(upstream_fn, tensors, dev, None) if upstream_fn is not None else None
            err_p, tol_p = worst(kit, portable, terms)
            err_u, tol_u = worst(kit, theirs, terms) if theirs is not None else (0.0, float("inf"))
            ok = not fallbacks and err_p <= tol_p and err_u <= tol_u
            detail = f"vs portable {err_p:.3g} (tolerance {tol_p:.3g})"
            detail += f", vs upstream kernel {err_u:.3g} (tolerance {tol_u:.3g})" if theirs is not None else ""
            if fallbacks:
                detail += "; the kit did not use the kernel: " + " | ".join(fallbacks)
            max_error, bound = (err_p, tol_p) if err_p / tol_p >= err_u / tol_u else (err_u, tol_u)
            results.append(check(name, "ops", ok, time.time() - t0, max_error, bound, detail))
        except Exception as exc:  # noqa: BLE001 - one op's failure must not hide the others
            results.append(check(name, "ops", False, time.time() - t0, detail=f"{type(exc).__name__}: {exc}"))

    g = torch.Generator().manual_seed(0)
    # bev_pool_v2: FB-BEV's kernel (runs of sorted ranks), C = 80 as FB-OCC
    b, n, d, h, w, c, grid = 1, 6, 20, 8, 22, 80, (4, 25, 25)
    depth = torch.rand(b, n, d, h, w, generator=g)
    feat = torch.randn(b, n, h, w, c, generator=g)
    p = 20000
    rd = torch.randperm(depth.numel(), generator=g)[:p]
    rf = (rd // (d * h * w)) * (h * w) + rd % (h * w)  # the frustum point's own pixel, as LSS
    rb = torch.sort(torch.randint(0, b * grid[0] * grid[1] * grid[2], (p,), generator=g)).values
    order = torch.argsort(rb, stable=True)
    rd, rf, rb = rd[order].int(), rf[order].int(), rb[order].int()
    shape = (b,) + grid + (c,)
    starts, lengths = ops.compute_intervals(rb)

    def kit_bev(dp, ft):
        return ops.bev_pool_v2(dp, ft, rd.to(dp.device), rf.to(dp.device), rb.to(dp.device), shape,
                               starts.to(dp.device), lengths.to(dp.device))

    def upstream_bev(dp, ft):
        from mmdet3d.ops.bev_pool_v2.bev_pool import bev_pool_v2
        return bev_pool_v2(dp, ft, rd.to(dev), rf.to(dev), rb.to(dev), list(shape), starts.to(dev), lengths.to(dev))

    per_cell = int(lengths.max())
    compare("bev_pool_v2", kit_bev, upstream_bev, [depth, feat], max(per_cell, c))

    # voxel pooling (BEVDepth): 6 x 28 x 16 x 44 points into 128 x 128
    geom = torch.randint(-4, 132, (2, 6 * 28 * 16 * 44, 3), generator=g).int()
    geom[..., 2] = torch.randint(-1, 2, geom.shape[:2], generator=g).int()
    feats = torch.randn(2, geom.shape[1], 80, generator=g)

    def upstream_vpt(f):
        from bevdepth.ops.voxel_pooling_train import voxel_pooling_train
        return voxel_pooling_train(geom.to(dev), f.contiguous(), torch.tensor([128, 128, 1]).to(dev))

    inside = ((geom >= 0) & (geom < torch.tensor([128, 128, 1], dtype=torch.int32))).all(-1)
    cells = (torch.arange(2).view(2, 1) * 128 + geom[..., 1].long()) * 128 + geom[..., 0].long()
    most = int(torch.bincount(cells[inside]).max())
    compare("voxel_pooling_train", lambda f: ops.voxel_pooling_train(geom.to(f.device), f, [128, 128, 1]),
            upstream_vpt, [feats], most)
    geom6 = geom[:1, :6 * 28 * 16 * 44].reshape(1, 6, 28, 16, 44, 3)
    dep = torch.rand(6, 28, 16, 44, generator=g)
    ctx = torch.randn(6, 80, 16, 44, generator=g)

    def upstream_vpi(dp, cx):
        from bevdepth.ops.voxel_pooling_inference import voxel_pooling_inference
        return voxel_pooling_inference(geom6.to(dev), dp.contiguous(), cx.contiguous(),
                                       torch.tensor([128, 128, 1]).to(dev))

    compare("voxel_pooling_inference",
            lambda dp, cx: ops.voxel_pooling_inference(geom6.to(dp.device), dp, cx, [128, 128, 1]),
            upstream_vpi, [dep, ctx], most)

    # multi-scale deformable attention (mmcv's kernel): FB-OCC's DA cross-attention shape class
    shapes = torch.tensor([[16, 44]])
    lvl = torch.tensor([0])
    value = torch.randn(6, 704, 8, 10, generator=g)
    loc = torch.rand(6, 300, 8, 1, 8, 2, generator=g)
    attn = torch.rand(6, 300, 8, 1, 8, generator=g).softmax(-1)

    def upstream_msda(v, l_, a):
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
        return MultiScaleDeformableAttnFunction.apply(v, shapes.to(dev), lvl.to(dev), l_, a, 64)

    compare("multi_scale_deformable_attn",
            lambda v, l_, a: ops.multi_scale_deformable_attn(v, shapes.to(v.device), lvl.to(v.device), l_, a),
            upstream_msda, [value, loc, attn], 300 * 8 * 4)

    depth_prob = torch.rand(6, 704, 80, generator=g).softmax(-1)
    ref_pts = torch.rand(6, 300, 4, 2, generator=g)
    bins = torch.randint(0, 80, (6, 300, 4), generator=g)

    def upstream_da(v, l_, a, dp):  # upstream's CUDA math: sample depth with MSDA, one-hot dot, weight, MSDA
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction as K
        s, st = shapes.to(dev), lvl.to(dev)
        wts = K.apply(dp.unsqueeze(2), s, st, ref_pts.to(dev).reshape(6, 1200, 1, 1, 1, 2),
                      torch.ones(6, 1200, 1, 1, 1, device=dev), 64).view(6, 300, 4, 80)
        wts = (wts * F.one_hot(bins.to(dev), 80)).sum(-1).unsqueeze(2).repeat(1, 1, 2, 1).reshape(6, 300, 8)
        return K.apply(v, s, st, l_, a * wts[:, :, None, None, :], 64)

    compare("depth_weighted_deformable_attn",
            lambda v, l_, a, dp: ops.depth_weighted_deformable_attn(v, shapes.to(v.device), lvl.to(v.device), l_, a,
                                                                    dp, ref_pts.to(v.device), bins.to(v.device)),
            upstream_da, [value, loc, attn, depth_prob], 300 * 8 * 4)

    # grid_sample_3d: torch's own CUDA kernel (there is no separate upstream op)
    compare("grid_sample_3d", lambda i, gr: ops.grid_sample_3d(i, gr),
            lambda i, gr: F.grid_sample(i, gr, mode="bilinear", padding_mode="zeros", align_corners=True),
            [torch.randn(1, 80, 8, 50, 50, generator=g), torch.rand(1, 8, 50, 50, 3, generator=g) * 2.1 - 1.05],
            8, terms=[(8, 1.0), (64, 1.0), (8 * 80, 25.0)])  # output; input grad; grid grad over C, x (size-1)/2

    pred = torch.randn(20000, 18, generator=g) * 3
    target = torch.randint(0, 19, (20000,), generator=g)

    def upstream_focal(p_):
        from mmcv.ops import sigmoid_focal_loss
        return sigmoid_focal_loss(p_, target.to(dev), 2.0, 0.25, None, "none")

    compare("sigmoid_focal_loss", lambda p_: ops.sigmoid_focal_loss(p_, target.to(p_.device), 2.0, 0.25, None, "none"),
            upstream_focal, [pred], 1)

    x = torch.randn(2, 128, 16, 44, generator=g)
    off = torch.randn(2, 18, 16, 44, generator=g)
    wt = torch.randn(128, 32, 3, 3, generator=g) * 0.05

    def upstream_dcn(i, o, w_):
        from mmcv.ops.deform_conv import deform_conv2d
        return deform_conv2d(i, o, w_, 1, 1, 1, 4, 1, False, 128)

    compare("deform_conv2d", lambda i, o, w_: ops.deform_conv2d(i, o, w_, 1, 1, 1, 4, 1), upstream_dcn,
            [x, off, wt], 0, terms=[(32 * 9 * 4, 0.1), (32 * 9 * 4, 1.0), (128 * 32 * 4, 2.0), (2 * 16 * 44, 2.0)])
    return results


def ops_phase(upstream_dir: Optional[Path], timeout: float = 240) -> List[Dict[str, object]]:
    t0 = time.time()
    argv = [sys.executable, "-m", "bevkit.gpu_check", "--child", "ops"]
    if upstream_dir:
        argv += ["--upstream-dir", str(upstream_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                          if p]))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return [check("ops", "ops", False, time.time() - t0, detail=f"timed out after {timeout:.0f} s")]
    marker = "GPU_CHECK_OPS "
    if marker not in proc.stdout:
        return [check("ops", "ops", False, time.time() - t0,
                      detail=f"the ops child exited {proc.returncode}: {proc.stderr[-2000:]}")]
    return json.loads(proc.stdout.split(marker, 1)[1].strip().splitlines()[0])


# --------------------------------------------------------------------------------------------------- models

#: FB-OCC's tiny config with the reference recipe's fp16 (mmcv Fp16OptimizerHook) and gradient clipping.
FBOCC_FP16_CONFIG = """_base_ = [{base!r}]
fp16 = dict(loss_scale='dynamic')
optimizer_config = dict(grad_clip=dict(max_norm=5, norm_type=2))
"""

#: Evidence in train.log that the intended CUDA path ran (mmcv's hook list; Lightning's AMP banner).
MODEL_EVIDENCE = {"fbocc": ("Fp16OptimizerHook",), "bevdepth": ("16bit",)}


def model_phase(model: str, steps: Optional[int], work_dir: Path, data_root: Optional[Path],
                launch: Optional[Callable[[List[str], Dict[str, str]], subprocess.CompletedProcess]] = None,
                timeout: float = 240) -> Dict[str, object]:
    """A few training steps through the launcher's smoke flow (data preparation, training, and for BEVDepth an
    evaluation launch); the check reads the training run's results.json and train.log."""
    t0 = time.time()
    work = work_dir / model
    work.mkdir(parents=True, exist_ok=True)
    argv = ["--model", model, "--mode", "smoke", "--device", "cuda", "--nproc", "1", "--work-dir", str(work)]
    if steps is not None:
        argv += ["--max-steps", str(steps)]
    if data_root:
        argv += ["--data-root", str(data_root)]
    if model == "fbocc":
        cfg = work / "fbocc_tiny_fp16.py"
        cfg.write_text(FBOCC_FP16_CONFIG.format(base=str(REPO_ROOT / "fbocc" / "configs" / "fbocc_tiny_smoke.py")))
        argv += ["--config", str(cfg)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    if launch is None:
        def launch(a, e):
            return subprocess.run([str(REPO_ROOT / "tools" / "launch"), *a], capture_output=True, text=True,
                                  env=e, timeout=timeout, cwd=str(REPO_ROOT))
    try:
        proc = launch(argv, env)
    except subprocess.TimeoutExpired:
        return check(f"train {model}", "models", False, time.time() - t0, detail=f"timed out after {timeout:.0f} s")
    paths = [line.split("results: ", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("results: ")]
    if not paths:
        return check(f"train {model}", "models", False, time.time() - t0,
                     detail=f"launcher exited {proc.returncode} without results.json: {proc.stderr[-1500:]}")
    res = json.loads(Path(paths[0]).read_text())  # the training run (smoke may evaluate afterwards)
    log = Path(paths[0]).parent / "train.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    missing = [e for e in MODEL_EVIDENCE[model] if e not in text]
    losses = [res.get("loss_first"), res.get("loss_last")]
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses)
    ok = res.get("exit_code") == 0 and finite and not missing
    detail = (f"training exit {res.get('exit_code')} (launcher {proc.returncode}), steps {res.get('steps')}, loss "
              f"{losses[0]} -> {losses[1]}, step time median {res.get('step_time_median_s')} s")
    if missing:
        detail += f"; train.log lacks {missing} (fp16/AMP path not confirmed)"
    return check(f"train {model}", "models", ok, time.time() - t0, detail=detail)


# ----------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, gpu: str) -> Dict[str, object]:
    import torch

    t0 = time.time()
    checks: List[Dict[str, object]] = []
    if "build" in args.phases:
        checks += build_phase(args.upstream_dir)
    if "ops" in args.phases:
        checks += ops_phase(args.upstream_dir)
    if "models" in args.phases:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="bevkit-gpu-check-"))
        for model in args.models:
            checks.append(model_phase(model, args.steps, work, args.data_root))
    return summary(checks, time.time() - t0, gpu, torch.__version__, torch.version.cuda)


def summary(checks: List[Dict[str, object]], seconds: float, gpu: str, torch_version: str,
            cuda: Optional[str]) -> Dict[str, object]:
    return {"passed": all(c["pass"] for c in checks) and bool(checks), "seconds": round(seconds, 1), "gpu": gpu,
            "torch": torch_version, "cuda": cuda, "checks": checks}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    ok, what = cuda_status()
    if not ok:
        print(f"gpu_check: no CUDA GPU: {what}. Run it on a machine with an NVIDIA GPU set up with "
              "'bash setup.sh --profile cuda'.", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.child == "ops":
        print("GPU_CHECK_OPS " + json.dumps(ops_child(args.upstream_dir)), flush=True)
        return EXIT_OK
    result = run(args, what)
    print(json.dumps(result, indent=1))
    return EXIT_OK if result["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
