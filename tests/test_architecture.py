"""The package's layering, held by walking its imports (static, with ``ast``).

Layers, each importing only from those below it (docs/architecture.md):

    cli                                      the command line
    integrations/ (hf, deepspeed, megatron_lm)  thin layers over the core
    eval/  training/                         what users run
    inference/                               the engine, sampling, launching
    checkpoints/                             checkpoint I/O, model families, building
    megatron/                                Megatron-Core glue
    parallel/  compress  heads  layout  comm  forward  adapter   algorithms and their parts
    ops/                                     attention math, no process groups
    config  configargs  errors  registry  atomic  watchdog  partition   settings, their
                                             validation, crash-safe saves, naming stalled
                                             collectives, the per-rank cost model

``data/`` (prompts and tasks) sits beside the core and imports only the bottom floor.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megatron_apb"

# top-level part of the package -> parts it must never import
FORBIDDEN = {
    "ops": {"parallel", "compress", "heads", "layout", "comm", "forward", "adapter", "megatron",
            "inference", "checkpoints", "training", "eval", "data", "integrations", "cli", "configargs"},
    "parallel": {"megatron", "inference", "checkpoints", "training", "eval", "data", "integrations", "cli"},
    "comm": {"ops", "parallel", "megatron", "inference", "checkpoints", "training", "eval", "data", "integrations", "cli"},
    "compress": {"parallel", "megatron", "inference", "checkpoints", "training", "eval", "data", "integrations", "cli"},
    "megatron": {"inference", "checkpoints", "training", "eval", "data", "integrations", "cli"},
    "checkpoints": {"inference", "training", "eval", "data", "integrations", "cli"},
    "inference": {"training", "eval", "integrations", "cli"},
    "training": {"eval", "integrations", "cli"},
    "eval": {"training", "integrations", "cli"},
    "data": {"ops", "parallel", "megatron", "inference", "checkpoints", "training", "eval", "integrations", "cli"},
    "integrations": {"cli"},
}
BOTTOM = {"config", "configargs", "errors", "registry", "_lazy", "atomic", "watchdog", "partition"}
for part in BOTTOM:
    FORBIDDEN[part] = {"ops", "parallel", "compress", "heads", "layout", "comm", "forward", "adapter",
                       "megatron", "inference", "checkpoints", "training", "eval", "data", "integrations", "cli"}

#: function-local imports allowed in the whole package (each carries a reason)
MAX_LOCAL_IMPORTS = 20
#: lines above which a module must say why it is that long
MAX_LINES = 400


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, parts, ast.parse(path.read_text(encoding="utf-8"))


def _targets(path, parts, tree):
    """(imported top-level part of megatron_apb, line) pairs of a module."""
    pkg_parts = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:
                    names = [".".join(base + [a.name]) for a in node.names]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] == "megatron_apb" and len(bits) > 1:
                yield bits[1], node.lineno


def test_no_upward_imports():
    bad = []
    for path, parts, tree in _modules():
        if len(parts) < 2:
            continue
        own = parts[1]
        for target, line in _targets(path, parts, tree):
            if target in FORBIDDEN.get(own, ()):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_layering_rules_cover_every_part():
    parts = {p[1] for _, p, _ in _modules() if len(p) > 1}
    unknown = parts - set(FORBIDDEN) - {"heads", "layout", "forward", "adapter", "cli", "__main__"}
    assert not unknown, f"add these parts of the package to the layering rules: {sorted(unknown)}"


def _local_imports(tree):
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    found.append(sub.lineno)
    return sorted(set(found))


def test_few_function_local_imports():
    per_file = {}
    for path, _, tree in _modules():
        lines = _local_imports(tree)
        if lines:
            per_file[str(path.relative_to(PACKAGE.parent))] = lines
    total = sum(len(v) for v in per_file.values())
    assert total <= MAX_LOCAL_IMPORTS, f"{total} function-local imports (at most {MAX_LOCAL_IMPORTS}): {per_file}"


def test_each_local_import_states_its_reason():
    missing = []
    for path, _, tree in _modules():
        source = path.read_text(encoding="utf-8").splitlines()
        for line in _local_imports(tree):
            window = " ".join(source[max(0, line - 3) : line])
            if "local:" not in window:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert not missing, "function-local imports without a '# local: <reason>' comment: " + ", ".join(missing)


def test_long_modules_state_why():
    long = []
    for path, _, tree in _modules():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(tree) or ""
        if n > MAX_LINES and f"{MAX_LINES} lines" not in doc:
            long.append(f"{path.relative_to(PACKAGE.parent)} ({n} lines)")
    assert not long, f"modules above {MAX_LINES} lines without a reason in their docstring: {long}"


@pytest.mark.parametrize("part", ["ops", "parallel", "config", "registry", "errors", "data"])
def test_core_parts_import_without_megatron(part):
    """The lower floors (and task generation) work without Megatron-Core imported."""
    import subprocess
    import sys

    code = (
        "import sys, importlib; importlib.import_module('megatron_apb.%s'); "
        "bad = [m for m in sys.modules if m.startswith('megatron.core')]; "
        "sys.exit(1 if bad else 0)" % part
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"megatron_apb.{part} imports megatron.core"
