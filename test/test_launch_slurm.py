"""Slurm: the hostlist expander, the cluster shape from faked SLURM_* variables (dry runs through the launcher's
pure plan and through tools/launch), the refusals, and a real 2-node x 1-process gloo run of the toy entry with
two launcher tasks on this machine, as ``srun --ntasks-per-node=1`` would start them (about 15 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bevkit import REPO_ROOT, launch
from bevkit.launch import slurm
from test_launch import BASE_ENV, plan_for, stub, torchrun  # noqa: F401  (stub is a fixture)

TOY = str(REPO_ROOT / "test" / "assets" / "toy_spec.py") + ":SPEC"


def srun_env(node, nodes=2, job="4711", nodelist="gpu-a[01-02]", **more):
    """What srun sets in each task of `srun --nodes=2 --ntasks-per-node=1` (the variables the launcher reads)."""
    return dict(SLURM_JOB_ID=job, SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
                SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NUM_TASKS=str(nodes), SLURM_NTASKS=str(nodes),
                SLURM_STEP_ID="0", SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
                SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist, **more)


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("gpu-a[01-03]", ["gpu-a01", "gpu-a02", "gpu-a03"]),
    ("gpu-a[01-02,07],login1", ["gpu-a01", "gpu-a02", "gpu-a07", "login1"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a,b[3,5]-ib", ["a", "b3-ib", "b5-ib"]),
])
def test_hostlist_expansion(text, hosts):
    assert slurm.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-2", "n]1", "n[a-b]", "n[5-3]", ""])
def test_bad_hostlists_are_refused(text):
    with pytest.raises(slurm.SlurmError, match="hostlist"):
        slurm.expand_hostlist(text)


def test_detection_needs_a_job_and_a_task():
    assert slurm.detected(srun_env(0))
    assert not slurm.detected({"SLURM_JOB_ID": "1"})  # e.g. a login shell inheriting the job id only
    assert not slurm.detected({"SLURM_NODEID": "0"})
    assert slurm.job_port("4711") == slurm.PORT_BASE + 4711 and slurm.job_port("123_4") == slurm.PORT_BASE + 123
    assert slurm.job_port("x") is None


def test_two_nodes_of_8_from_slurm_dry_run(stub):  # noqa: F811
    port = slurm.PORT_BASE + 4711
    plans = [plan_for(stub, "--mode", "full", "--device", "cpu", environ=dict(BASE_ENV, **srun_env(node)))
             for node in (0, 1)]
    for node, plan in enumerate(plans):  # detected without --launcher: the same command, only the rank differs
        assert plan.argv[:10] == torchrun(2, 8, node, "gpu-a01", port)
        assert plan.launcher == "slurm" and plan.request.world_size == 16
        assert plan.request.run_dir.name.endswith(f"-node{node}")
        assert any("slurm: job 4711, node %d of 2" % node in n and "gpu-a01" in n for n in plan.notes)
    assert plans[0].argv[10:] == plans[1].argv[10:]
    # options win over Slurm; MASTER_PORT over the job's port; Slurm wins over NNODES / NODE_RANK
    env = dict(BASE_ENV, NNODES="4", NODE_RANK="3", MASTER_PORT="29999", **srun_env(1))
    plan = plan_for(stub, "--mode", "full", "--device", "cpu", "--master-addr", "10.0.0.5", environ=env)
    assert plan.argv[:10] == torchrun(2, 8, 1, "10.0.0.5", 29999)
    # --launcher local ignores the Slurm job
    local = plan_for(stub, "--mode", "full", "--device", "cpu", "--launcher", "local",
                     environ=dict(BASE_ENV, **srun_env(0)))
    assert local.launcher == "local" and local.argv[:10] == torchrun(1, 8, 0, "127.0.0.1", local.master_port)


def test_slurm_plan_is_pure(stub, monkeypatch):  # noqa: F811
    """The Slurm shape is read from the machine's environment as data: no scontrol, no process."""
    def no_process(*args, **kwargs):
        raise AssertionError(f"plan() started a process: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    machine = launch.Machine(environ=dict(BASE_ENV, **srun_env(1, nodelist="n[3,5]")), cores=4,
                             upstream_checkout=lambda name: (stub.checkout, [stub.checkout]),
                             upstream_problems=lambda name: [], free_port=lambda: 1, detect_device=lambda: "cpu")
    request = launch.parse(["--model", "stubnet", "--mode", "full", "--data-root", str(stub.data),
                            "--work-dir", str(stub.work), "--nproc", "2"])
    plan = launch.plan(request, machine)
    assert plan.argv[:10] == torchrun(2, 2, 1, "n3", slurm.PORT_BASE + 4711) and not stub.work.exists()


def test_slurm_refusals_name_the_fix(stub):  # noqa: F811
    def refused(environ, *options):
        with pytest.raises(launch.LaunchError) as info:
            plan_for(stub, "--mode", "full", "--device", "cpu", *options, environ=dict(BASE_ENV, **environ))
        return str(info.value)

    assert "SLURM_JOB_ID is not set" in refused({}, "--launcher", "slurm")
    batch = {k: v for k, v in srun_env(0).items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_NODES",
                                                                "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")}
    message = refused(batch)
    assert "batch script of a 2-node" in message and "srun" in message and "--launcher local" in message
    message = refused(dict(srun_env(0), SLURM_STEP_NUM_TASKS="16"))
    assert "16 tasks on 2 node(s)" in message and "--ntasks-per-node=1" in message
    assert "names 3 host(s)" in refused(srun_env(0, nodelist="n[1-3]"))
    assert "SLURM_NODEID" in refused({k: v for k, v in srun_env(0).items() if k != "SLURM_NODEID"},
                                     "--launcher", "slurm")
    # a one-node batch script may launch directly
    single = {k: v for k, v in srun_env(0, nodes=1, nodelist="n7").items() if not k.startswith("SLURM_STEP")}
    plan = plan_for(stub, "--mode", "full", "--device", "cpu", environ=dict(BASE_ENV, **single))
    assert plan.argv[:10] == torchrun(1, 8, 0, "n7", slurm.PORT_BASE + 4711)


def _tools_launch(tmp_path, environ, *options):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEVKIT_", "SLURM_", "MASTER_", "NNODES",
                                                                     "NODE_RANK"))}
    env.update(environ, BEVKIT_PYTHON=sys.executable)
    return subprocess.Popen(
        [str(REPO_ROOT / "tools" / "launch"), "--spec", TOY, "--device", "cpu", "--data-root", str(data),
         "--work-dir", str(tmp_path / "runs"), *options],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_tools_launch_dry_run_under_srun(tmp_path):
    proc = _tools_launch(tmp_path, srun_env(1, job="77"), "--mode", "performance", "--nproc", "8", "--dry-run")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "# slurm: job 77, node 1 of 2 (SLURM_NODEID), master gpu-a01" in out
    assert (f"--nnodes=2 --nproc_per_node=8 --node_rank=1 --master_addr=gpu-a01 "
            f"--master_port={slurm.PORT_BASE + 77}") in out
    assert not (tmp_path / "runs").exists()


def test_two_node_gloo_run_from_a_faked_slurm_step(tmp_path):
    """Two launcher tasks (nodes 0 and 1 of one faked job, one process each) train the toy model together."""
    from bevkit.launch.plan import free_port

    port = str(free_port())
    procs = [_tools_launch(tmp_path, srun_env(node, nodelist="localhost,localhost", MASTER_PORT=port),
                           "--mode", "performance", "--nproc", "1", "--max-steps", "6") for node in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    results = [json.loads(Path(o.rstrip().splitlines()[-1].split("results: ", 1)[1]).read_text()) for o in outs]
    for node, r in enumerate(results):
        assert r["nodes"] == 2 and r["world_size"] == 2 and r["node_rank"] == node and r["status"] == "ok"
        launch_record = json.loads((Path(r["run_dir"]) / "launch.json").read_text())
        assert launch_record["request"]["launcher"] == "slurm"
        assert launch_record["request"]["master_addr"] == "localhost"
        assert Path(r["run_dir"]).name.endswith(f"-node{node}")
    assert results[0]["steps"] == 6 and results[0]["global_batch"] == 8  # rank 0 (node 0) records the steps
    log = (Path(results[1]["run_dir"]) / "train.log").read_text()
    assert "rank 1: done after" in log  # node 1 ran global rank 1


def test_sbatch_example_runs_one_launcher_task_per_node(tmp_path):
    """tools/slurm/train_2x8.sbatch under a fake srun that starts its command once per node with the variables
    srun sets: both tasks plan the same 2 x 8 torchrun command (the script's arguments reach the launcher: a dry
    run here)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "echo \"srun $*\"\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "for node in 0 1; do\n"
        "  SLURM_STEP_ID=0 SLURM_NODEID=$node SLURM_PROCID=$node SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=2 \\\n"
        "    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \"$@\" || exit $?\n"
        "done\n")
    (fake_bin / "srun").chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEVKIT_", "SLURM_", "MASTER_"))}
    env.update(PATH=f"{fake_bin}:{env.get('PATH', '')}", BEVKIT_PYTHON=sys.executable, SLURM_JOB_ID="9",
               SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NODEID="0", SLURM_PROCID="0",
               SLURM_JOB_NODELIST="npu[7-8]", MODEL="bevdepth", DATA_ROOT=str(data))
    out = subprocess.run(["bash", str(REPO_ROOT / "tools/slurm/train_2x8.sbatch"), "--dry-run", "--no-data-check"],
                         cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bevdepth/test/train_8p_full.sh --launcher " \
           f"slurm --nproc 8 --data-root {data} --dry-run --no-data-check" in out.stdout
    for node in (0, 1):
        assert (f"--nnodes=2 --nproc_per_node=8 --node_rank={node} --master_addr=npu7 "
                f"--master_port={slurm.PORT_BASE + 9}") in out.stdout
