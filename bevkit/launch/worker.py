"""What every training process runs first: ``torchrun ... -m bevkit.launch.worker SCRIPT ARGS``.

Two things no entry point should have to repeat:

- **No orphans.** torchrun starts each worker in a session of its own, so when torchrun dies without
  cleaning up (SIGKILL, out of memory) its workers would train on with PPID 1, writing checkpoints and holding
  the devices. Each worker therefore asks Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG,
  SIGKILL)``): it dies the moment torchrun does. The launcher gives torchrun the same signal
  (:func:`die_with_parent` as its ``preexec_fn``), so a SIGKILL to the launcher stops the whole tree.
- **One line for bad input.** A :class:`bevkit.errors.UserError` raised in the entry point (e.g. a checkpoint
  that does not match the model) is printed once as ``error: ...`` (global rank 0) and the process exits with
  the error's code, instead of a traceback per rank; rank 0 also leaves it in ``$BEVKIT_RUN_DIR/error.json``,
  so the launcher repeats the line last and exits with that code.

Then the script runs as ``python SCRIPT ARGS`` would run it (``__main__``, ``sys.argv``, its folder first on
``sys.path``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import runpy
import signal
import sys
from typing import Optional, Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc = None


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc.prctl


def supported() -> bool:
    return sys.platform.startswith("linux")


def die_with_parent(sig: int = signal.SIGKILL, parent: Optional[int] = None) -> None:
    """Linux: deliver ``sig`` to this process when its parent dies; if the parent (pid ``parent``, default
    the current one) is already gone, die now. A no-op elsewhere. Safe in a ``preexec_fn``."""
    if not supported():
        return
    expected = os.getppid() if parent is None else parent
    _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != expected:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def preexec_for(parent: int):
    """A ``preexec_fn`` giving the child a SIGKILL parent-death signal (libc resolved now, before fork)."""
    if not supported():
        return None
    _prctl()
    return lambda: die_with_parent(signal.SIGKILL, parent)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m bevkit.launch.worker SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    die_with_parent(signal.SIGKILL)
    script = os.path.abspath(argv[0])
    sys.argv = [argv[0], *argv[1:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` has it (-m put the working folder there)
    from bevkit.errors import UserError

    try:
        runpy.run_path(script, run_name="__main__")
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
            _record(e)
        return e.exit_code
    return 0


ERROR_FILE = "error.json"


def _record(error) -> None:
    """Tell the launcher (through the run folder) which one-line error ended the run and its exit code."""
    import json

    run_dir = os.environ.get("BEVKIT_RUN_DIR")
    if run_dir and os.path.isdir(run_dir):
        with open(os.path.join(run_dir, ERROR_FILE), "w", encoding="utf-8") as f:
            json.dump({"message": str(error), "exit_code": error.exit_code}, f)


if __name__ == "__main__":
    sys.exit(main())
