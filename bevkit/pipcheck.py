"""``python -m bevkit.pipcheck``: ``pip check`` for this environment, with the findings the pins cause knowingly.

Each ``pip check`` line names a package and one of its declared requirements (missing, or at another version).
``configs/requirements/pip-check-known.txt`` lists the pairs the kit accepts on purpose, each with its reason
(mmdet3d 1.0.0rc4 declares pins that no current stack can meet). Anything else is a problem: exit status 1.
"""
from __future__ import annotations

import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from . import REPO_ROOT

KNOWN_FILE = REPO_ROOT / "configs" / "requirements" / "pip-check-known.txt"

# pip's two finding formats (src/pip/_internal/commands/check.py):
#   "<name> <version> requires <req>, which is not installed."
#   "<name> <version> has requirement <req-with-specifier>, but you have <name> <version>."
_LINE = re.compile(r"^(?P<pkg>\S+) \S+ (?:requires (?P<missing>[A-Za-z0-9._-]+)|has requirement "
                   r"(?P<conflict>[A-Za-z0-9._-]+))")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def known(text: Optional[str] = None) -> Dict[Tuple[str, str], str]:
    """``{(package, requirement): why}`` from pip-check-known.txt (or ``text`` in its format)."""
    if text is None:
        text = KNOWN_FILE.read_text()
    out: Dict[Tuple[str, str], str] = {}
    for raw in text.splitlines():
        line, _, why = raw.partition("#")
        words = line.split()
        if len(words) == 2:
            out[(_norm(words[0]), _norm(words[1]))] = why.strip()
        elif words:
            raise ValueError(f"{KNOWN_FILE.name}: expected '<package> <requirement>  # why', got {raw!r}")
    return out


def classify(output: str, accepted: Dict[Tuple[str, str], str]) -> Tuple[List[str], List[str]]:
    """(accepted lines with their reason, problem lines) of ``pip check`` output."""
    ok, problems = [], []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        m = _LINE.match(line)
        key = (_norm(m.group("pkg")), _norm(m.group("missing") or m.group("conflict"))) if m else None
        if key in accepted:
            ok.append(f"{line}  (known: {accepted[key]})")
        else:
            problems.append(line)
    return ok, problems


def run(python: str = sys.executable) -> Tuple[int, str]:
    proc = subprocess.run([python, "-m", "pip", "check"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    return proc.returncode, proc.stdout


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bevkit.pipcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter whose environment to check")
    args = parser.parse_args(argv)
    rc, output = run(args.python)
    ok, problems = classify(output, known())
    for line in ok:
        print(f"pip check: {line}")
    for line in problems:
        print(f"pip check: PROBLEM {line}")
    if rc != 0 and not ok and not problems:  # pip failed without a finding we could read
        print(f"pip check: PROBLEM pip exited {rc}: {output.strip()}")
        return 1
    if problems:
        print(f"pip check: {len(problems)} unexpected finding(s): fix the pins in configs/requirements/, or, when a "
              f"package's declared requirement is knowingly overridden, list it in {KNOWN_FILE.name} with the reason")
        return 1
    print(f"pip check: ok, only the {len(ok)} known finding(s) of {KNOWN_FILE.name}" if ok else "pip check: clean")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
