"""Device detection and the CPU-stands-in-for-NPU emulation used by fake-NPU tests."""
import pytest
import torch

from bevkit import device


def test_profile_detection_without_torch():
    none = lambda name: None
    assert device.detect_profile(which=none, environ={}) == "cpu"
    assert device.detect_profile(which=lambda n: "/usr/bin/nvidia-smi" if n == "nvidia-smi" else None,
                                 environ={}) == "cuda"
    assert device.detect_profile(which=lambda n: "/usr/local/bin/npu-smi" if n == "npu-smi" else None,
                                 environ={}) == "npu"
    assert device.detect_profile(which=none, environ={"ASCEND_HOME_PATH": "/usr/local/Ascend"}) == "npu"
    assert device.detect_profile(which=none, environ={"BEVKIT_PROFILE": "cuda"}) == "cuda"
    with pytest.raises(ValueError, match="BEVKIT_PROFILE"):
        device.detect_profile(which=none, environ={"BEVKIT_PROFILE": "tpu"})


def test_cpu_only_machine_reports_cpu():
    devices = device.available_devices()
    assert devices[-1] == "cpu"
    if not torch.cuda.is_available():
        assert "cuda" not in devices


def test_emulation_is_scoped():
    t = torch.zeros(1)
    assert device.device_type(t) == "cpu"
    with device.emulate_device("npu"):
        assert device.device_type(t) == "npu"
        assert device.device_type("cpu") == "npu"
    assert device.device_type(t) == "cpu"
    with pytest.raises(ValueError):
        with device.emulate_device("tpu"):
            pass


def test_emulation_from_environment(monkeypatch):
    monkeypatch.setenv("BEVKIT_EMULATE_DEVICE", "npu")
    assert device.device_type(torch.zeros(1)) == "npu"


def test_cpu_autocast_uses_bfloat16():
    with device.autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16
