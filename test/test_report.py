"""tools/report: Markdown table beside the reference results, and PNG plots of loss and step time."""
from __future__ import annotations

import subprocess

import pytest

from bevkit import REPO_ROOT, report
from bevkit import results as res


def _run(tmp_path, name, **kw):
    records = [{"step": i, "time_s": 2.0 if i <= 2 else 1.5, "loss": 20.0 / i, "samples": kw.get("batch", 32)}
               for i in range(1, 41)]
    results = res.build_results(records=records, metrics=kw.get("metrics", {}), model=kw.get("model", "fbocc"),
                                display_name=kw.get("display", "FBOCC"), mode="performance",
                                device=kw.get("device", "npu"), nproc_per_node=8, nnodes=1,
                                batch_per_device=kw.get("batch", 32) // 8, e2e_duration_s=100.0,
                                versions={"python": "3.8"})
    path, _, _ = res.write_results(tmp_path / name, results)
    return path


def test_markdown_table_beside_the_reference(tmp_path):
    a = res.load_results(_run(tmp_path, "run-a", metrics={"miou": 39.5}))
    b = res.load_results(_run(tmp_path, "run-b", model="bevdepth", display="BEVDepth", batch=64, device="cuda",
                              metrics={"map": 0.321, "nds": 0.43}))
    text = report.markdown([a, b])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| run-")}
    # FB-OCC: 32 samples / 1.5 s = 21.33 FPS, vs the 20.80 FPS of the NPU reference (same cards and batch)
    assert "21.33" in rows["run-a"] and f"{21.333333 / 20.80:.2f}x (Atlas 800T A2 (NPU))" in rows["run-a"]
    assert "mIoU 39.50" in rows["run-a"] and "1,500.0 / 1,500.0" in rows["run-a"] and "40 (4)" in rows["run-a"]
    # BEVDepth on CUDA: 64 / 1.5 = 42.67 FPS vs the GPU reference 22.11
    assert "42.67" in rows["run-b"] and f"{42.666667 / 22.11:.2f}x (competitor GPU)" in rows["run-b"]
    assert "mAP 32.10 / NDS 43.00" in rows["run-b"]
    # the reference rows (ANCHORS.md numbers)
    assert "mIoU 39.85" in text and "20.80" in text and "1,538" in text
    assert "mAP 32.53 / NDS 43.32" in text and "32.29" in text and "mAP 33.04 / NDS 43.55" in text


def test_fps_comparison_only_at_the_same_scale(tmp_path):
    small = res.load_results(_run(tmp_path, "run-s", batch=16))  # global batch 16 is not the reference's 32
    assert report.reference_for(small) is None
    assert "| - |" in report.markdown([small])


def test_cli_writes_markdown_and_pngs(tmp_path):
    a = _run(tmp_path, "run-a")
    b = _run(tmp_path, "run-b")
    out = subprocess.run([str(REPO_ROOT / "tools" / "report"), str(a), str(b.parent), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "rep" / "report.md").read_text() in out.stdout
    for name in ("loss.png", "step_time.png"):
        data = (tmp_path / "rep" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    missing = subprocess.run([str(REPO_ROOT / "tools" / "report"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no results.json" in missing.stderr


def test_plot_without_step_records(tmp_path):
    results = res.build_results(records=[], metrics={}, model="fbocc", display_name="FBOCC", mode="eval",
                                device="cpu", nproc_per_node=1, nnodes=1, batch_per_device=1,
                                versions={})
    paths = report.plot([results], tmp_path)
    assert [p.name for p in paths] == ["loss.png", "step_time.png"] and all(p.stat().st_size > 0 for p in paths)
