"""The kit's structure: the environment contract, one model registry, reference results as data, modules
that import alone and without cycles, files of a size one can hold in one's head."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bevkit import REPO_ROOT, env
from bevkit.models import MODELS, all_specs

KIT = REPO_ROOT / "bevkit"
#: the kit's code and scripts (tests may set variables of their own)
CODE = [p for p in REPO_ROOT.rglob("*")
        if p.is_file() and p.suffix in (".py", ".sh", ".env", "") and not p.name.startswith(".")
        and p.relative_to(REPO_ROOT).parts[0] in ("bevkit", "tools", "fbocc", "bevdepth", "configs", "setup.sh",
                                                   ".ci")
        and "__pycache__" not in p.parts]


def _modules():
    for path in sorted(KIT.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


# ------------------------------------------------------------------------------------ environment contract

def test_every_bevkit_variable_the_kit_reads_is_in_the_contract():
    used = {}
    for path in CODE + [REPO_ROOT / "setup.sh", REPO_ROOT / ".ci" / "run"]:
        if path.is_file():
            for name in re.findall(r"\bBEVKIT_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
                used.setdefault(name, path.relative_to(REPO_ROOT))
    unlisted = {name: str(where) for name, where in used.items() if name not in env.BY_NAME}
    assert not unlisted, f"add these to bevkit/env.py (name, set by, default, meaning): {unlisted}"
    stale = sorted(set(env.BY_NAME) - set(used))
    assert not stale, f"bevkit/env.py lists variables nothing reads: {stale}"
    with pytest.raises(KeyError, match="contract"):
        env.get("BEVKIT_NOT_A_VARIABLE")


def test_readme_table_is_the_contract():
    readme = (REPO_ROOT / "README.md").read_text()
    assert env.markdown_table() in readme, "README's environment table differs: paste `python -m bevkit.env`"


# ------------------------------------------------------------------------------------------ the registry

def test_shared_modules_iterate_over_the_registered_models():
    from bevkit import doctor, patching, report, upstream
    from bevkit.data import validate

    specs = all_specs()
    assert [s.name for s in specs] == list(MODELS)
    assert set(patching.PATCH_SETS) == {"common", *MODELS}
    assert {up.model for up in upstream.UPSTREAMS.values()} == set(MODELS)
    assert validate.MODELS == doctor.MODEL_NAMES == tuple(MODELS)
    for spec in specs:
        assert upstream.get(spec.name) is spec.upstream
        assert spec.data_module().check and spec.data_module().PREPARE_HINT
        assert spec.metrics and spec.references and spec.reference_rows()
        assert {r["model"] for r in report.references([spec.name])} == {spec.name}


def test_reference_results_are_data_behind_the_readme_tables():
    """README.md's "Reference results" table is generated from the models' reference files
    (``tools/report --reference-table``); each model README quotes its own numbers."""
    from bevkit import report

    readme = (REPO_ROOT / "README.md").read_text()
    assert report.reference_table() in readme
    for spec in all_specs():
        text = (REPO_ROOT / spec.name / "README.md").read_text()
        for row in spec.reference_rows():
            if row["fps"] is not None:
                assert f"{row['fps']:.2f}" in text, (spec.name, row)
            for key, value in row["accuracy"].items():
                name, factor = spec.metrics[key]
                assert f"{value * factor:.2f}" in text, (spec.name, name, row)


def test_performance_config_runs_as_many_steps_as_the_launcher_stops_after():
    from bevkit.launch import DEFAULT_PERFORMANCE_STEPS

    text = (REPO_ROOT / "fbocc/configs/fbocc_r50_8p_performance.py").read_text()
    assert re.search(rf"^performance_iters = {DEFAULT_PERFORMANCE_STEPS}\b", text, re.M)
    assert "--max-steps" not in (REPO_ROOT / "fbocc/test/train_8p_performance.sh").read_text()


# ------------------------------------------------------------------------------------------- modules

def _imports(path: Path, module: str):
    """Kit modules a file imports (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "bevkit" or n.startswith("bevkit."))
    return found


def test_kit_import_graph_has_no_cycles():
    modules = dict(_modules())
    graph = {}
    for module, path in modules.items():
        graph[module] = {m for m in _imports(path, module) if m in modules and m != module
                         and not module.startswith(m + ".")}  # a package's own parents are not edges
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_kit_module_imports_alone_in_a_fresh_process():
    def load(module):
        proc = subprocess.run([sys.executable, "-c", "import importlib, sys; importlib.import_module(sys.argv[1])",
                               module], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=300)
        return module, proc.returncode, proc.stderr[-1500:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(m, err) for m, rc, err in pool.map(load, [m for m, _ in _modules()]) if rc != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)


#: Kit files over ~400 lines, each one cohesive thing.
LARGE_AND_COHESIVE = {
    "bevkit/upstream.py": "materialize / verify / patch / status of the upstream checkouts (git plumbing)",
    "bevkit/data/world.py": "the synthetic street world (one generator)",
    "bevkit/data/synthetic.py": "the synthetic nuScenes writer (one format)",
    "tools/bench_ops.py": "one benchmark script per op at the models' shapes",
    "bevkit/gpu_check.py": "the one GPU check: build the CUDA extensions, op parity, fp16 model steps, one JSON",
}


def test_kit_files_stay_small_unless_cohesive():
    big = {}
    for path in CODE:
        if path.suffix == ".py":
            lines = len(path.read_text(errors="replace").splitlines())
            rel = str(path.relative_to(REPO_ROOT))
            if lines > 420 and rel not in LARGE_AND_COHESIVE:
                big[rel] = lines
    assert not big, f"split these by concern (or say why they are one thing): {big}"
