"""The package's import graph keeps the data's one direction (module-level and function-level imports)."""

import ast
from pathlib import Path

import pytest

import lightning_sae_samples

ROOT = Path(lightning_sae_samples.__file__).parent
PKG = "lightning_sae_samples"
MODULES = {
    ".".join((PKG, *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): p for p in ROOT.rglob("*.py")
}
# Old import paths that forward to the new modules for one release (they import on first attribute access).
SHIMS = {f"{PKG}.storage", f"{PKG}.records", f"{PKG}._moved"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules imported, top-level names of other packages imported), type-checking imports aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for body in node.body for n in ast.walk(body)}
    ours, others = set(), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        ours |= {n for n in names if n in MODULES}
        others |= {n.split(".")[0] for n in names if not n.startswith(PKG)}
    return ours, others


GRAPH = {name: _imports(path)[0] - {name} for name, path in MODULES.items() if not name.endswith("__main__")}
# The package's __init__ re-exports: a module importing the package itself is not a cycle of the reading side.
GRAPH[PKG] = set()


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(folder: str) -> list[str]:
    return [m for m in GRAPH if m == f"{PKG}.{folder}" or m.startswith(f"{PKG}.{folder}.")]


def test_no_import_cycle():
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("folder", ["analysis", "render"])
def test_the_reading_side_never_reaches_the_engine(folder):
    for module in _in(folder):
        reached = {m for m in _reach(module) if m.startswith(f"{PKG}.engine")}
        assert not reached, f"{module} imports the engine through {sorted(reached)}"


def test_the_engine_imports_no_lightning_and_does_no_io():
    io_calls = {"open", "torch.save", "torch.load", "print"}
    io_methods = {"write_text", "read_text", "write_bytes", "read_bytes", "mkdir", "unlink"}
    for module in _in("engine"):
        _, others = _imports(MODULES[module])
        assert not others & {"lightning", "pytorch_lightning", "os", "pathlib", "shutil", "json"}, module
        reached = {m for m in _reach(module) if not m.startswith((f"{PKG}.engine", f"{PKG}.state", f"{PKG}.config"))}
        assert reached <= {f"{PKG}.arguments", f"{PKG}.schedule"}, f"{module} reaches {sorted(reached)}"
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        names = {ast.unparse(f) for f in calls} | {f.attr for f in calls if isinstance(f, ast.Attribute)}
        assert not names & (io_calls | io_methods), module


def test_the_writer_does_not_import_the_analyzer_nor_records_a_compute_module():
    assert not {m for m in _reach(f"{PKG}.samples_dir.writer") if m.startswith(f"{PKG}.analysis")}
    assert not _reach(f"{PKG}.analysis.records") & set(_in("analysis"))
    assert not {m for m in _reach(f"{PKG}.state.schema") if m.startswith((f"{PKG}.engine", f"{PKG}.samples_dir"))}


def test_only_the_shims_and_the_package_are_outside_the_folders_or_named_top_level_modules():
    top = {m for m, path in MODULES.items() if m.count(".") == 1 and path.name != "__init__.py"} - SHIMS
    expected = {"__main__", "arguments", "callback", "cli", "collector", "config", "health", "inputs", "memory",
                "printed_commands", "rows_with_refs", "schedule", "sharding", "token_sources", "tokens"}
    assert {m.split(".")[1] for m in top} <= expected, sorted(top)


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("lightning_sae_samples.storage", "read_samples_dir", "lightning_sae_samples.samples_dir.reader"),
        ("lightning_sae_samples.storage", "SUMMARY_NAME", "lightning_sae_samples.samples_dir.names"),
        ("lightning_sae_samples.records", "FeatureSamples", "lightning_sae_samples.analysis.records"),
        ("lightning_sae_samples.collector", "histogram_edges", "lightning_sae_samples.engine.bins"),
        ("lightning_sae_samples.collector", "merge_states", "lightning_sae_samples.state.merge"),
        ("lightning_sae_samples", "padded_state", "lightning_sae_samples.state.tables"),
        ("lightning_sae_samples", "estimate_state_bytes", "lightning_sae_samples.engine.memory"),
    ],
)
def test_old_import_paths_still_resolve_with_a_deprecation_warning(old, name, new):
    import importlib

    with pytest.warns(DeprecationWarning, match=new.rsplit(".", 1)[0]):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)


def test_the_top_level_lists_what_users_call_and_not_the_engine():
    names = dir(lightning_sae_samples)
    assert {"ActivationSampleCallback", "ActivationSampleCollector", "CollectionConfig", "__version__"} <= set(names)
    assert not {"SampleCollector", "merge_states", "padded_state", "estimate_state_bytes"} & set(names)
    assert lightning_sae_samples.CollectionConfig.__module__ == "lightning_sae_samples.config"
