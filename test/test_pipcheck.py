"""bevkit.pipcheck: pip check's findings against the known list, and this environment's own pip check."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bevkit import pipcheck

OUTPUT = """\
mmdet3d 1.0.0rc4 requires scikit-image, which is not installed.
mmdet3d 1.0.0rc4 has requirement numba==0.53.0, but you have numba 0.58.1.
mmdet 2.28.0 has requirement numpy<2, but you have numpy 2.1.0.
lyft-dataset-sdk 0.0.8 requires black, which is not installed.
"""


def test_known_findings_are_accepted_and_anything_else_is_a_problem():
    accepted = pipcheck.known("mmdet3d scikit_image  # converter only\nMMDet3D numba  # old pin\n\n# comment\n")
    ok, problems = pipcheck.classify(OUTPUT, accepted)
    assert ok == ["mmdet3d 1.0.0rc4 requires scikit-image, which is not installed.  (known: converter only)",
                  "mmdet3d 1.0.0rc4 has requirement numba==0.53.0, but you have numba 0.58.1.  (known: old pin)"]
    assert problems == ["mmdet 2.28.0 has requirement numpy<2, but you have numpy 2.1.0.",
                        "lyft-dataset-sdk 0.0.8 requires black, which is not installed."]
    assert pipcheck.classify("No broken requirements found.\n", accepted) == ([], [])
    assert pipcheck.classify("something pip never printed before\n", accepted)[1] == [
        "something pip never printed before"]


def test_known_list_format_is_checked():
    with pytest.raises(ValueError, match="expected '<package> <requirement>"):
        pipcheck.known("mmdet3d numba==0.53.0 extra  # a version does not belong here\n")
    entries = pipcheck.known()  # the committed list parses, and every entry says why
    assert entries and all(why for why in entries.values())


def test_this_environment_has_no_unexpected_pip_check_findings(capsys):
    """Every venv setup.sh makes (cpu on 3.11, npu --emulate on 3.8, ...) passes pip check but for the known list."""
    if not (Path(sys.prefix) / ".bevkit-stamps" / "kit").is_file():
        pytest.skip(f"the running venv {sys.prefix} was not made by setup.sh")
    rc = pipcheck.main([])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PROBLEM" not in out
