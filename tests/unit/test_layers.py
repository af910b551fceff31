"""The house rules, read from the code: every module's imports (module level and inside functions) go to its
own subpackage or a lower layer, siblings stay apart, no private name crosses modules, no cycle, and the
library below the stages takes config sections, never the whole manifest or run directory."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first; a layer imports only layers below it (and itself). Layers in one tuple are siblings that do
# not import each other.
LAYERS = [("core",), ("domain",), ("config",), ("data", "model"), ("training", "report"), ("jobs",), ("cluster",),
          ("simulation",), ("cli",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
SECTIONS_ONLY = ("data", "model", "training", "report")


def room(module: str) -> str | None:
    """The layer of a project module (``respect_hpc.model.chat`` -> model; ``jobs.train`` -> jobs)."""
    parts = module.split(".")
    if parts[0] == "jobs":
        return "jobs"
    if parts[0] == "respect_hpc" and len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return None


def modules():
    for path in sorted([*(ROOT / "respect_hpc").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text())


def imports(tree: ast.AST):
    """(imported module, names) of every import statement, wherever it stands."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]


ALL = dict(modules())


def test_every_library_module_lives_in_a_layer():
    loose = [m for m in ALL if room(m) is None and m not in ("respect_hpc",)]
    assert loose == []


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_go_down_only(module):
    mine = room(module)
    if mine is None:
        return
    wrong = []
    for target, names in imports(ALL[module]):
        theirs = room(target)
        if target == "respect_hpc" and names:  # from respect_hpc import sub
            theirs = room(f"respect_hpc.{names[0]}") or mine
        if theirs is None or theirs == mine:
            continue
        if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine]):
            wrong.append(f"{module} imports {target} ({theirs} is not below {mine})")
    assert wrong == []


# Private names of other packages used on purpose, each pinned by a test of what the project relies on.
PINNED_PRIVATE = {"submitit.slurm.slurm._make_sbatch_string": "tests/unit/cluster/test_sbatch.py"}


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_private_name_crosses_modules(module):
    crossing = [f"{target}.{n}" for target, names in imports(ALL[module]) for n in names
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in PINNED_PRIVATE]
    assert crossing == []


def test_each_pinned_private_name_has_its_test():
    for name, test in PINNED_PRIVATE.items():
        assert name.rsplit(".", 1)[1] in (ROOT / test).read_text(), (name, test)


@pytest.mark.parametrize("module", sorted(m for m in ALL if room(m) in SECTIONS_ONLY))
def test_the_library_takes_sections_not_the_whole_manifest_or_run_directory(module):
    """Below the stages, code is handed manifest sections and the folders it writes (a TaskDir, a DataDir); the
    report alone reads whole run directories, those its user names, through their layout."""
    wholes = ("Manifest", "load_manifest") if room(module) == "report" else ("Manifest", "RunDir", "load_manifest")
    taken = [f"{target}.{n}" for target, names in imports(ALL[module]) for n in names if n in wholes]
    assert taken == []


def test_only_the_cluster_layer_makes_submitit_executors():
    makers = [m for m, tree in ALL.items() if room(m) != "cluster" and any(
        isinstance(node, ast.Attribute) and node.attr.endswith("Executor") and node.attr != "JobEnvironment"
        for node in ast.walk(tree))]
    assert makers == []


def test_no_stage_imports_another():
    """Stages share only the registry's types; the plan wires them through files."""
    stages = [m for m in ALL if m.startswith("jobs.") and m != "jobs.registry"]
    crossing = [f"{m} imports {t}" for m in stages for t, _ in imports(ALL[m])
                if (t.startswith("jobs.") or t == "jobs") and t != "jobs.registry"]
    assert stages and crossing == []


def test_no_import_cycle_at_module_level():
    graph = {}
    for module, tree in ALL.items():
        deps = set()
        for node in tree.body:  # module level only: imports inside functions run later
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & ALL.keys()
                deps.update(submodules or {node.module})  # from a package, its submodules: the package is a parent
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[module] = {d for d in deps if d in ALL and d != module}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in graph[node]:
            visit(dep)
        stack.pop()

    for module in graph:
        visit(module)
    assert cycles == []
