"""The package's shape: imports point down the layer table only, no module imports itself back in a
cycle, and the modules the CLI needs before it runs a command load no MLX.

Every `import` statement counts, function-local ones included: a cycle held together by an import
inside a function is still a cycle. docs/architecture.md shows the same table.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own unit and any unit of a lower layer, nothing else.
# (Layer 0 is ordered within itself too: see FOUNDATION.)
LAYERS = [
    ("foundation", ["tinymoe", "tinymoe.errors", "tinymoe.paths", "tinymoe.backend", "tinymoe.names", "tinymoe.jsonutil",
                    "tinymoe.quick", "tinymoe.text_input", "tinymoe.router_registry", "tinymoe.domains",
                    "tinymoe.precision_check", "tinymoe.config", "tinymoe.stages", "tinymoe.planner", "tinymoe.fit_plan", "tinymoe.finetune_plan", "tinymoe.memory_check", "tinymoe.distill_plan",
                    "tinymoe.distributed_plan"]),
    ("parts", ["tinymoe.nn", "tinymoe.optim", "tinymoe.tokenizers"]),
    ("stores", ["tinymoe.data", "tinymoe.io"]),
    ("workflows", ["tinymoe.train", "tinymoe.infer", "tinymoe.analysis", "tinymoe.interop"]),
    ("run", ["tinymoe.run"]),
    ("cli", ["tinymoe.cli"]),
]
# Inside the foundation, each module may import only the ones listed before it.
FOUNDATION = ["tinymoe.errors", "tinymoe.paths", "tinymoe.names", "tinymoe.jsonutil", "tinymoe.quick", "tinymoe.text_input", "tinymoe.backend",
              "tinymoe", "tinymoe.router_registry", "tinymoe.domains", "tinymoe.precision_check", "tinymoe.config",
              "tinymoe.stages", "tinymoe.planner", "tinymoe.fit_plan",
              "tinymoe.finetune_plan", "tinymoe.memory_check", "tinymoe.distill_plan", "tinymoe.distributed_plan"]
# Imported before a command runs (`tinymoe --help`, argument parsing, config checks, planning).
MLX_FREE = [*FOUNDATION, "tinymoe.interop.hf_config", "tinymoe.cli.main"]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__); cli/ installs as tinymoe.cli."""
    found = {}
    for path in sorted((ROOT / "tinymoe").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "cli":
            parts = ["tinymoe", *parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """The tinymoe modules `name` imports anywhere in its body."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from tinymoe.nn import routers` imports the module tinymoe.nn.routers
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    resolved = set()
    for target in targets:
        if not (target == "tinymoe" or target.startswith("tinymoe.")):
            continue
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        if target != name:
            resolved.add(target)
    return resolved


MODULES = _modules()
GRAPH = {name: _imports(name, path, pkg, MODULES) for name, (path, pkg) in MODULES.items()}


def _unit(module: str) -> str:
    """The row of LAYERS a module belongs to (its subpackage, or itself at top level)."""
    units = [u for _, names in LAYERS for u in names if u != "tinymoe"]
    best = max((u for u in units if module == u or module.startswith(u + ".")), key=len, default=None)
    return best or module


def _layer(unit: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"{unit} is in no layer of tests/test_layers.py (add it to LAYERS and "
                         f"docs/architecture.md)")


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(_unit(module))


def test_imports_point_down_only():
    wrong = []
    for module, targets in GRAPH.items():
        here = _unit(module)
        for target in targets:
            there = _unit(target)
            if there == here:
                continue
            if _layer(there) > _layer(here) or (_layer(there) == _layer(here) and here not in FOUNDATION):
                wrong.append(f"{module} -> {target}")
            elif _layer(here) == 0 and FOUNDATION.index(there) > FOUNDATION.index(here):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer table:\n  " + "\n  ".join(sorted(wrong))


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of two or more modules is a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The checker itself: function-local, `from package import module` and relative imports all
    count, and the table orders the layers the design asks for."""
    source = tmp_path / "probe.py"
    source.write_text("import os\nfrom tinymoe.nn import routers\n\n\ndef f():\n"
                      "    from tinymoe.train.step import Stepper\n    from ..io import checkpoint\n"
                      "    import tinymoe.cli.main\n")
    seen = _imports("tinymoe.nn.probe", source, False, MODULES)
    assert seen == {"tinymoe.nn.routers", "tinymoe.train.step", "tinymoe.io.checkpoint", "tinymoe.cli.main"}
    layer = {u: _layer(_unit(u)) for u in ("tinymoe.config", "tinymoe.nn.moe", "tinymoe.io.loader",
                                           "tinymoe.train.step", "tinymoe.cli.train")}
    assert layer["tinymoe.config"] < layer["tinymoe.nn.moe"] < layer["tinymoe.io.loader"] \
        < layer["tinymoe.train.step"] < layer["tinymoe.cli.train"] == len(LAYERS) - 1


def test_help_and_the_cli_constants_load_no_mlx():
    """`tinymoe --help` and every command's `--help` (read from the click group, so a new command is
    covered without editing this test), in one fresh interpreter."""
    code = (f"import sys\nimport {', '.join(MLX_FREE)}\nfrom tinymoe.cli.main import cli\n"
            "for args in [['--help'], *[[name, '--help'] for name in sorted(cli.commands)]]:\n"
            "    try:\n        cli.main(args, prog_name='tinymoe', standalone_mode=False)\n"
            "    except SystemExit as exc:\n        assert exc.code in (0, None), (args, exc.code)\n"
            "assert len(cli.commands) >= 13, sorted(cli.commands)\n"
            "loaded = sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.'))\n"
            "assert not loaded, loaded\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
