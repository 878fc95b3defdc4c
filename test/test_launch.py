"""The shared launcher: exact torchrun command and environment per device / cluster shape (dry runs),
refusals with clear messages, and run folders that never touch earlier runs."""
from __future__ import annotations

import os
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bevkit import REPO_ROOT, launch
from bevkit.models import MODELS, ModelSpec

BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/user", "LANG": "C.UTF-8"}


def _entry(request):
    argv = ["tools/train.py", str(request.config), "--launcher", "pytorch"]
    if request.checkpoint:
        argv += ["--checkpoint", str(request.checkpoint)]
    return argv + list(request.extra_args)


STUB = ModelSpec(name="stubnet", display_name="StubNet", upstream="Stub-Up", samples_per_device=4,
                 build_entry=_entry, configs={"full": "configs/env/cpu.env",
                                              "performance": "configs/env/cpu.env"})


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """The stub spec registered as a model, an upstream checkout in tmp, a data root."""
    module = types.ModuleType("_bevkit_test_stubnet")
    module.SPEC = STUB
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(MODELS, "stubnet", module.__name__)
    checkout = tmp_path / "upstream" / "Stub-Up"
    checkout.mkdir(parents=True)
    monkeypatch.setattr(launch, "upstream_checkout", lambda name: (checkout, [checkout]))
    monkeypatch.setattr(launch, "upstream_problems", lambda name: [])
    data = tmp_path / "data"
    data.mkdir()
    return types.SimpleNamespace(checkout=checkout, data=data, work=tmp_path / "runs", tmp=tmp_path)


def plan_for(stub, *options, environ=None, cores=16, extra=()):
    args = launch.build_parser().parse_args(
        ["--model", "stubnet", "--data-root", str(stub.data), "--work-dir", str(stub.work), "--dry-run",
         *options])
    return launch.make_plan(args, list(extra), environ=dict(BASE_ENV if environ is None else environ),
                            cores=cores)


def bevkit_env(stub, plan, mode, device, batch=4, max_steps=None):
    env = {"BEVKIT_RUN_DIR": str(plan.request.run_dir), "BEVKIT_MODEL": "stubnet", "BEVKIT_MODE": mode,
           "BEVKIT_DEVICE": device, "BEVKIT_DATA_ROOT": str(stub.data), "BEVKIT_SAMPLES_PER_DEVICE": str(batch),
           "PYTHONUNBUFFERED": "1"}
    if max_steps is not None:
        env["BEVKIT_MAX_STEPS"] = str(max_steps)
    return env


def torchrun(nnodes, nproc, node_rank, addr, port):
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}", "-m", "bevkit.launch.worker"]


NPU_SETTINGS = {"ASCEND_SLOG_PRINT_TO_STDOUT": "0", "ASCEND_GLOBAL_LOG_LEVEL": "3",
                "ASCEND_GLOBAL_EVENT_ENABLE": "0", "TASK_QUEUE_ENABLE": "2", "CPU_AFFINITY_CONF": "1",
                "COMBINED_ENABLE": "1", "HCCL_CONNECT_TIMEOUT": "1200", "HCCL_WHITELIST_DISABLE": "1"}


@pytest.fixture
def cann(tmp_path):
    """A fake CANN install: ascend-toolkit/set_env.sh next to ascend-toolkit/latest."""
    toolkit = tmp_path / "Ascend" / "ascend-toolkit"
    (toolkit / "latest").mkdir(parents=True)
    (toolkit / "set_env.sh").write_text(
        'export ASCEND_TOOLKIT_HOME="%s/latest"\n'
        'export LD_LIBRARY_PATH="$ASCEND_TOOLKIT_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n'
        'export PYTHONPATH="$ASCEND_TOOLKIT_HOME/python/site-packages${PYTHONPATH:+:$PYTHONPATH}"\n'
        % toolkit)
    return toolkit


def test_npu_8_devices_one_node(stub, cann):
    environ = dict(BASE_ENV, ASCEND_HOME_PATH=str(cann / "latest"))
    plan = plan_for(stub, "--mode", "full", "--device", "npu", "--master-port", "29611",
                    environ=environ, extra=["--cfg-options", "a=1"])
    config = str(REPO_ROOT / "configs/env/cpu.env")
    assert plan.argv == torchrun(1, 8, 0, "127.0.0.1", 29611) + [
        "tools/train.py", config, "--launcher", "pytorch", "--cfg-options", "a=1"]
    latest = str(cann / "latest")
    expected = {"ASCEND_TOOLKIT_HOME": latest, "LD_LIBRARY_PATH": f"{latest}/lib64",
                "PYTHONPATH": f"{stub.checkout}:{REPO_ROOT}:{latest}/python/site-packages",
                **NPU_SETTINGS, **bevkit_env(stub, plan, "full", "npu")}
    assert plan.env_set == expected
    assert plan.env_unset == []
    assert plan.cann_set_env == cann / "set_env.sh"
    assert plan.cwd == stub.checkout
    assert plan.request.world_size == 8 and plan.batch_per_device == 4
    assert plan.request.run_dir.parent == stub.work and not stub.work.exists()


def test_user_environment_wins_over_env_file_and_stale_max_steps_is_removed(stub, cann):
    environ = dict(BASE_ENV, BEVKIT_CANN_SET_ENV=str(cann / "set_env.sh"), TASK_QUEUE_ENABLE="1",
                   BEVKIT_MAX_STEPS="5")
    plan = plan_for(stub, "--mode", "full", "--device", "npu", "--master-port", "29611", environ=environ)
    assert plan.env["TASK_QUEUE_ENABLE"] == "1" and "TASK_QUEUE_ENABLE" not in plan.env_set
    assert plan.env_unset == ["BEVKIT_MAX_STEPS"] and "BEVKIT_MAX_STEPS" not in plan.env
    assert "-u BEVKIT_MAX_STEPS" in launch.render_command(plan)


def test_npu_two_nodes_of_8(stub, cann):
    environ = dict(BASE_ENV, ASCEND_HOME_PATH=str(cann / "latest"))
    plan = plan_for(stub, "--mode", "performance", "--device", "npu", "--nnodes", "2", "--node-rank", "1",
                    "--master-addr", "10.0.0.1", environ=environ)
    # same port on every node: the fixed default, and the launcher says so
    assert plan.argv == torchrun(2, 8, 1, "10.0.0.1", 29500) + [
        "tools/train.py", str(REPO_ROOT / "configs/env/cpu.env"), "--launcher", "pytorch"]
    assert any("29500" in note for note in plan.notes)
    assert plan.request.world_size == 16 and plan.request.max_steps == launch.DEFAULT_PERFORMANCE_STEPS
    assert plan.env_set["BEVKIT_MAX_STEPS"] == str(launch.DEFAULT_PERFORMANCE_STEPS)
    assert plan.request.run_dir.name.endswith("-node1")
    latest = str(cann / "latest")
    assert plan.env_set == {"ASCEND_TOOLKIT_HOME": latest, "LD_LIBRARY_PATH": f"{latest}/lib64",
                            "PYTHONPATH": f"{stub.checkout}:{REPO_ROOT}:{latest}/python/site-packages",
                            **NPU_SETTINGS,
                            **bevkit_env(stub, plan, "performance", "npu", max_steps=600)}
    # environment variables work like OpenMMLab's dist_train.sh
    env2 = dict(environ, NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.1", MASTER_PORT="29700")
    plan2 = plan_for(stub, "--mode", "performance", "--device", "npu", environ=env2)
    assert plan2.argv[:10] == torchrun(2, 8, 0, "10.0.0.1", 29700)


def test_multi_node_needs_master_addr_and_valid_rank(stub):
    with pytest.raises(launch.LaunchError, match="--master-addr"):
        plan_for(stub, "--mode", "full", "--device", "cpu", "--nnodes", "2", "--node-rank", "1")
    with pytest.raises(launch.LaunchError, match="--node-rank"):
        plan_for(stub, "--mode", "full", "--device", "cpu", "--nnodes", "2", "--node-rank", "2",
                 "--master-addr", "10.0.0.1")


def test_one_cuda_gpu(stub):
    plan = plan_for(stub, "--mode", "full", "--device", "cuda", "--nproc", "1", "--master-port", "29612")
    assert plan.argv == torchrun(1, 1, 0, "127.0.0.1", 29612) + [
        "tools/train.py", str(REPO_ROOT / "configs/env/cpu.env"), "--launcher", "pytorch"]
    assert plan.env_set == {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                            "NCCL_ASYNC_ERROR_HANDLING": "1", "PYTHONPATH": f"{stub.checkout}:{REPO_ROOT}",
                            **bevkit_env(stub, plan, "full", "cuda")}


def test_two_cpu_processes_share_the_cores(stub, tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    plan = plan_for(stub, "--mode", "performance", "--device", "cpu", "--nproc", "2", "--master-port", "29613",
                    "--max-steps", "20", "--checkpoint", str(ckpt), cores=7,
                    environ=dict(BASE_ENV, PYTHONPATH="/user/lib"))
    assert plan.argv == torchrun(1, 2, 0, "127.0.0.1", 29613) + [
        "tools/train.py", str(REPO_ROOT / "configs/env/cpu.env"), "--launcher", "pytorch",
        "--checkpoint", str(ckpt)]
    assert plan.env_set == {"OMP_NUM_THREADS": "3", "PYTHONPATH": f"{stub.checkout}:{REPO_ROOT}:/user/lib",
                            **bevkit_env(stub, plan, "performance", "cpu", max_steps=20)}
    assert plan_for(stub, "--mode", "full", "--device", "cpu", "--nproc", "8", cores=2).env["OMP_NUM_THREADS"] == "1"


def test_single_node_default_port_is_free_and_env_port_is_used(stub):
    plan = plan_for(stub, "--mode", "full", "--device", "cpu", "--nproc", "2")
    assert 1024 <= plan.master_port < 65536
    assert plan.argv[7] == f"--master_port={plan.master_port}"
    plan = plan_for(stub, "--mode", "full", "--device", "cpu", environ=dict(BASE_ENV, MASTER_PORT="29999"))
    assert plan.master_port == 29999


def test_npu_without_cann_is_refused_with_the_fix(stub):
    environ = dict(BASE_ENV, ASCEND_HOME_PATH="/nonexistent/latest")
    args = launch.build_parser().parse_args(["--model", "stubnet", "--mode", "full", "--device", "npu",
                                             "--data-root", str(stub.data)])
    with pytest.raises(launch.LaunchError, match="ASCEND_HOME_PATH"):
        launch.make_plan(args, [], environ=environ)


def test_env_file_parsing(tmp_path):
    f = tmp_path / "x.env"
    f.write_text("# comment\n\nexport A=1\nB='two words'\nC=${A}-${MISSING:-dflt}-$HOME\nD=${B:-x}\n")
    values = launch.read_env_file(f, {"HOME": "/h"})
    assert values == {"A": "1", "B": "two words", "C": "1-dflt-/h", "D": "two words"}
    f.write_text("not a setting\n")
    with pytest.raises(launch.LaunchError, match="x.env:1"):
        launch.read_env_file(f, {})


def test_missing_data_root_is_refused_before_anything(stub, capsys):
    rc = launch.main(["--model", "stubnet", "--mode", "full", "--device", "cpu", "--nproc", "2",
                      "--data-root", str(stub.tmp / "no-such-data"), "--work-dir", str(stub.work)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no-such-data does not exist" in err and "--data-root" in err
    assert not stub.work.exists()


def test_validator_problems_refuse_the_launch(stub, monkeypatch, capsys):
    problem = types.SimpleNamespace(path="samples/CAM_FRONT", message="folder missing",
                                    fix="python -m bevkit.data.synthetic --out DIR")
    calls = []
    fake = types.ModuleType("bevkit.data.validate")
    fake.validate = lambda model, root, full=False: calls.append((model, root)) or [problem]
    monkeypatch.setitem(sys.modules, "bevkit.data.validate", fake)
    import bevkit.data as data_pkg
    monkeypatch.setattr(data_pkg, "validate", fake, raising=False)
    argv = ["--model", "stubnet", "--mode", "full", "--device", "cpu", "--nproc", "2",
            "--data-root", str(stub.data), "--work-dir", str(stub.work)]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert "not ready for stubnet" in err and "samples/CAM_FRONT: folder missing" in err
    assert "python -m bevkit.data.synthetic" in err
    assert calls == [("stubnet", stub.data)] and not stub.work.exists()
    # the dry run shows the problem but still prints the command
    assert launch.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "folder missing" in out and "torch.distributed.run" in out


def test_dry_run_prints_command_and_creates_nothing(stub, capsys):
    rc = launch.main(["--model", "stubnet", "--mode", "full", "--device", "cpu", "--nproc", "2",
                      "--master-port", "29614", "--data-root", str(stub.data), "--work-dir", str(stub.work),
                      "--no-data-check", "--dry-run", "--", "--seed", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "torch.distributed.run --nnodes=1 --nproc_per_node=2 --node_rank=0" in out
    assert "--master_port=29614 -m bevkit.launch.worker tools/train.py" in out and out.rstrip().endswith("--seed 0")
    assert "BEVKIT_MODE=full" in out and f"cd {stub.checkout}" in out
    assert not stub.work.exists()


def test_run_folders_are_new_and_never_reused(tmp_path):
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    first = launch.next_run_dir(tmp_path, now=now)
    (first / "checkpoint.pth").write_bytes(b"weights")
    second = launch.next_run_dir(tmp_path, now=now)
    third = launch.next_run_dir(tmp_path, node_rank=1, now=now)
    assert first.name == "20250102T030405Z" and second.name == "20250102T030405Z-1"
    assert third.name == "20250102T030405Z-node1"
    assert (first / "checkpoint.pth").read_bytes() == b"weights" and list(second.iterdir()) == []
    # the dry-run name is the one a real run would get now
    assert launch.next_run_dir(tmp_path, create=False, now=now).name == "20250102T030405Z-2"


def test_spec_option_and_model_mismatch(tmp_path):
    spec = launch.load_spec(None, str(REPO_ROOT / "test/assets/toy_spec.py") + ":SPEC")
    assert spec.name == "toy" and spec.upstream == ""
    with pytest.raises(launch.LaunchError, match="does not match"):
        launch.load_spec("fbocc", str(REPO_ROOT / "test/assets/toy_spec.py") + ":SPEC")
    with pytest.raises(launch.LaunchError, match="model is required|--model"):
        launch.load_spec(None, None)


def test_tools_launch_shell_entry_runs_the_module(tmp_path):
    """tools/launch resolves the repo root from any working directory and forwards the options."""
    import subprocess

    data = tmp_path / "data"
    data.mkdir()
    out = subprocess.run([str(REPO_ROOT / "tools" / "launch"), "--spec",
                          str(REPO_ROOT / "test/assets/toy_spec.py") + ":SPEC", "--mode", "smoke",
                          "--device", "cpu", "--nproc", "2", "--master-port", "29615", "--data-root", str(data),
                          "--work-dir", str(tmp_path / "runs"), "--dry-run", "--", "--steps", "3"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "BEVKIT_MAX_STEPS"})
    assert out.returncode == 0, out.stderr
    assert "toy_train.py --steps 3" in out.stdout and "--nproc_per_node=2" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_what_a_real_launch_would_refuse(stub, monkeypatch):
    missing = stub.tmp / "upstream" / "Not-There"
    monkeypatch.setattr(launch, "upstream_checkout", lambda name: (missing, [missing]))
    environ = dict(BASE_ENV, ASCEND_HOME_PATH="/nonexistent/latest")
    options = ["--mode", "eval", "--device", "npu", "--checkpoint", str(stub.tmp / "nope.pth"),
               "--config", str(stub.tmp / "nope.py")]
    plan = plan_for(stub, *options, environ=environ)
    text = "\n".join(plan.warnings)
    for expected in ("nope.py does not exist", "nope.pth does not exist", "not checked out", "CANN not found"):
        assert expected in text
    assert plan.cwd == REPO_ROOT  # no checkout to run in
    args = launch.build_parser().parse_args(["--model", "stubnet", "--data-root", str(stub.data), *options])
    with pytest.raises(launch.LaunchError, match="nope.py does not exist"):
        launch.make_plan(args, [], environ=environ)


def test_unusable_upstream_checkout_is_refused(stub, monkeypatch):
    monkeypatch.setattr(launch, "upstream_problems",
                        lambda name: ["patch fbocc.patch is not applied -> fix: run setup.sh"])
    args = launch.build_parser().parse_args(["--model", "stubnet", "--mode", "full", "--device", "cpu",
                                             "--data-root", str(stub.data)])
    with pytest.raises(launch.LaunchError, match="not usable:\n  patch fbocc.patch is not applied"):
        launch.make_plan(args, [], environ=dict(BASE_ENV))


def test_plan_is_pure_given_the_machine(stub, monkeypatch, tmp_path):
    """plan(request, machine) starts no process and creates nothing: the machine's facts come in as data."""
    import subprocess

    def no_process(*args, **kwargs):
        raise AssertionError(f"plan() started a process: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    machine = launch.Machine(environ=dict(BASE_ENV, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.9"), cores=4,
                             upstream_checkout=lambda name: (stub.checkout, [stub.checkout]),
                             upstream_problems=lambda name: [], free_port=lambda: 1,
                             detect_device=lambda: "cpu")
    request = launch.parse(["--model", "stubnet", "--mode", "performance", "--data-root", str(stub.data),
                            "--work-dir", str(stub.work), "--nproc", "2", "--", "--x", "1"])
    plan = launch.plan(request, machine)
    assert plan.argv[:10] == torchrun(2, 2, 1, "10.0.0.9", 29500)  # the environment's cluster shape
    assert plan.argv[10:] == ["tools/train.py", str(REPO_ROOT / "configs/env/cpu.env"), "--launcher", "pytorch",
                             "--x", "1"]
    assert plan.env_set["OMP_NUM_THREADS"] == "2" and plan.request.max_steps == launch.DEFAULT_PERFORMANCE_STEPS
    assert plan.launch is request and plan.batch_per_device == 4 and not stub.work.exists()


def test_demo_environment_defaults_reach_demo_runs_only_and_the_user_wins(stub, monkeypatch):
    """A model's ``demo_env`` (BEVDepth: JPEG draft decoding) is set for its demo runs, the training and the
    evaluation of the demo flow, unless the user's environment has the variable; never for other runs."""
    import dataclasses

    spec = dataclasses.replace(STUB, configs=dict(STUB.configs, demo="configs/env/cpu.env",
                                                  eval="configs/env/cpu.env"),
                               demo_env={"BEVKIT_JPEG_DRAFT": "1"})
    monkeypatch.setattr(sys.modules["_bevkit_test_stubnet"], "SPEC", spec)
    demo = plan_for(stub, "--mode", "demo", "--device", "cpu")
    assert demo.env_set["BEVKIT_JPEG_DRAFT"] == "1" and "BEVKIT_JPEG_DRAFT=1" in launch.render_command(demo)
    user = plan_for(stub, "--mode", "demo", "--device", "cpu", environ=dict(BASE_ENV, BEVKIT_JPEG_DRAFT="0"))
    assert user.env["BEVKIT_JPEG_DRAFT"] == "0" and "BEVKIT_JPEG_DRAFT" not in user.env_set
    args = launch.build_parser().parse_args(["--model", "stubnet", "--data-root", str(stub.data), "--work-dir",
                                             str(stub.work), "--dry-run", "--mode", "eval", "--device", "cpu",
                                             "--checkpoint", str(stub.tmp / "w.pth")])
    request = dataclasses.replace(launch.Request.from_args(args), flow="demo")
    evaluation = launch.make_plan(request, environ=dict(BASE_ENV), cores=16)
    assert evaluation.env_set["BEVKIT_JPEG_DRAFT"] == "1"
    for mode in ("full", "performance"):
        assert "BEVKIT_JPEG_DRAFT" not in plan_for(stub, "--mode", mode, "--device", "cpu").env
