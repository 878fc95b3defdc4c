"""Slurm: the cluster shape of a launch from the ``SLURM_*`` variables of an ``srun`` step (pure, no processes).

One launcher task per node (``srun --ntasks-per-node=1``) runs the same torchrun command as a manual multi-node
launch, with nodes, node rank and master address taken from Slurm:

- nodes: ``SLURM_STEP_NUM_NODES`` (the step), else ``SLURM_JOB_NUM_NODES`` / ``SLURM_NNODES`` (the job);
- node rank: ``SLURM_NODEID``;
- master address: the first host of ``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``
  (hostlist syntax such as ``gpu-a[01-02,07]``, expanded by :func:`expand_hostlist`);
- master port: ``MASTER_PORT`` if set, else derived from the job id (:func:`job_port`), so every node of a job
  agrees on it and two jobs sharing a node do not collide.

Detection (:func:`detected`): ``SLURM_JOB_ID`` together with ``SLURM_PROCID`` or ``SLURM_NODEID``. The batch
script of a multi-node job (no ``SLURM_STEP_ID``) runs on the first node only: it is refused with the srun line
to use, as is a step with more than one task per node (the launcher starts the per-node processes itself).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

#: ports derived from the job id lie in [PORT_BASE, PORT_BASE + PORT_SPAN)
PORT_BASE = 20000
PORT_SPAN = 20000

SRUN_HINT = "srun --nodes=N --ntasks-per-node=1 <model script> --launcher slurm ..."


class SlurmError(ValueError):
    """The Slurm environment cannot describe a launch (one line: what is wrong and the fix)."""


@dataclass(frozen=True)
class SlurmCluster:
    job_id: str
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: Optional[int]          # None: not derivable (no numeric job id and no MASTER_PORT)
    hosts: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def detected(environ: Mapping[str, str]) -> bool:
    """Whether this process runs inside a Slurm job task (srun step or batch script)."""
    return bool(environ.get("SLURM_JOB_ID")) and bool(environ.get("SLURM_PROCID") or environ.get("SLURM_NODEID"))


def _split_top(text: str) -> List[str]:
    """Split at commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"hostlist {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmError(f"hostlist {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _range_items(body: str, whole: str) -> List[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding of the lower bound kept, like Slurm)."""
    items: List[str] = []
    for piece in body.split(","):
        piece = piece.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if not m:
            raise SlurmError(f"hostlist {whole!r}: cannot read range {piece!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            items.append(lo)
            continue
        if int(hi) < int(lo):
            raise SlurmError(f"hostlist {whole!r}: range {piece!r} runs backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return items


def expand_hostlist(text: str) -> List[str]:
    """Slurm hostlist -> host names, in order: 'gpu-a[01-02,07],login1' -> gpu-a01, gpu-a02, gpu-a07, login1.
    Several bracket groups in one name expand as a product ('r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2)."""
    hosts: List[str] = []
    for part in _split_top(text.strip()):
        names = [""]
        for m in re.finditer(r"\[([^\[\]]*)\]|([^\[\]]+)", part):
            if m.group(2) is not None:
                names = [n + m.group(2) for n in names]
            else:
                names = [n + item for n in names for item in _range_items(m.group(1), text)]
        hosts.extend(names)
    if not hosts:
        raise SlurmError(f"hostlist {text!r} names no host")
    return hosts


def job_port(job_id: str) -> Optional[int]:
    digits = re.match(r"\d+", job_id or "")
    return PORT_BASE + int(digits.group(0)) % PORT_SPAN if digits else None


def _int(environ: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = (environ.get(name) or "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise SlurmError(f"{name}={value!r} is not an integer") from None
    return None


def cluster(environ: Mapping[str, str]) -> SlurmCluster:
    """The launch's cluster shape from the Slurm variables; SlurmError when they cannot give one."""
    job_id = (environ.get("SLURM_JOB_ID") or "").strip()
    if not job_id:
        raise SlurmError("--launcher slurm: SLURM_JOB_ID is not set; start the launcher inside a Slurm job: "
                         + SRUN_HINT)
    nnodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    if nnodes is None:
        raise SlurmError("--launcher slurm: none of SLURM_STEP_NUM_NODES, SLURM_JOB_NUM_NODES, SLURM_NNODES is set "
                         "(run under srun: " + SRUN_HINT + ")")
    node_rank = _int(environ, "SLURM_NODEID")
    if node_rank is None:
        raise SlurmError("--launcher slurm: SLURM_NODEID is not set (run under srun: " + SRUN_HINT + ")")
    in_step = bool(environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID"))
    if nnodes > 1 and not in_step:
        raise SlurmError(f"this is the batch script of a {nnodes}-node Slurm job: it runs on the first node only; "
                         f"start the launcher once per node with: {SRUN_HINT}")
    tasks = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if in_step else None
    if tasks is not None and tasks != nnodes:
        raise SlurmError(f"the Slurm step runs {tasks} tasks on {nnodes} node(s); the launcher needs one task per "
                         f"node (it starts --nproc processes per node itself): {SRUN_HINT}")
    nodelist = next((environ[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if (environ.get(n) or "").strip()), None)
    if nodelist is None:
        raise SlurmError("--launcher slurm: SLURM_JOB_NODELIST is not set, so the master node is unknown "
                         "(pass --master-addr ADDR)")
    hosts = expand_hostlist(nodelist)
    if len(hosts) != nnodes:
        raise SlurmError(f"the Slurm node list {nodelist!r} names {len(hosts)} host(s) but the step has "
                         f"{nnodes} node(s)")
    port = _int(environ, "MASTER_PORT") or job_port(job_id)
    note = (f"slurm: job {job_id}, node {node_rank} of {nnodes} (SLURM_NODEID), master {hosts[0]} (first of "
            f"{nodelist})" + (f", port {port}" + ("" if environ.get("MASTER_PORT") else " (from the job id)")
                              if port else ""))
    return SlurmCluster(job_id=job_id, nnodes=nnodes, node_rank=node_rank, master_addr=hosts[0],
                        master_port=port, hosts=hosts, notes=[note])
