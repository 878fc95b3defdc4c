"""Errors that are the user's input, not the kit's bug: printed as one line (``error: ...``) with a documented
exit code, never as a traceback (the launcher and :mod:`bevkit.launch.worker` catch them).

Exit codes (README, "Resume and checkpoints"): 2 bad launcher input (options, paths, data); 3 a checkpoint
that cannot be used (unreadable, another model's, incomplete, or untrusted without ``--trust-checkpoint``);
4 ``--resume`` of something that is not a resumable run of this model.
"""
from __future__ import annotations

EXIT_INPUT = 2
EXIT_CHECKPOINT = 3
EXIT_RESUME = 4


class UserError(Exception):
    """A problem with the user's input, as one line that names the thing and the fix."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, exit_code: int = 0):
        super().__init__(message)
        if exit_code:
            self.exit_code = exit_code


class CheckpointError(UserError):
    """A checkpoint that cannot be used for what was asked."""

    exit_code = EXIT_CHECKPOINT


class ResumeError(UserError):
    """``--resume`` of something that is not a resumable run of this model."""

    exit_code = EXIT_RESUME
