"""The package tree is the pipeline: no import cycles between peftc's modules, no peftc import hidden inside
a function (where it would hide a cycle), and no module or function too long to read in one sitting."""
import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[2] / "peftc"
#: modules over MAX_LINES or functions over MAX_FUNCTION_LINES say why at their top; none may grow past these
MAX_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(node, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The peftc modules an import statement loads (``from peftc.x import y`` loads peftc.x, and
    peftc.x.y when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("peftc"):
        return []
    out = [source] if source in known else []
    out += [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
    return out


def import_graph() -> tuple[nx.DiGraph, list[str]]:
    """Module-level imports as a graph, and every peftc import made inside a function."""
    found = modules()
    known = set(found)
    graph, deferred = nx.DiGraph(), []
    for name, path in found.items():
        graph.add_node(name)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported(node, name, is_package, known)
            top = node in tree.body or any(node in getattr(n, "body", []) for n in tree.body
                                           if isinstance(n, (ast.If, ast.Try)))
            if top:
                graph.add_edges_from((name, t) for t in targets if t != name)
            elif targets:
                deferred.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {', '.join(targets)}")
    return graph, deferred


def test_no_import_cycle_between_modules():
    graph, _ = import_graph()
    # a package's __init__ importing its own submodules is not a cycle of ideas; the rest must be acyclic
    edges = [(a, b) for a, b in graph.edges if not b.startswith(a + ".")]
    cycles = list(nx.simple_cycles(nx.DiGraph(edges)))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_no_peftc_import_inside_a_function():
    _, deferred = import_graph()
    assert not deferred, "\n".join(deferred)


def test_no_module_or_function_too_long_without_a_reason():
    long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_LINES:
            long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and "Long because" not in doc:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_every_declared_method_has_one_pass():
    """The syntax (peftc.methods.METHODS) and the passes (peftc.methods.passes.PASSES) are two lists; each
    keyword the parser accepts must compile, and no pass may be unreachable from the language."""
    from peftc.compiler.passmanager import load_passes
    from peftc.methods import METHODS
    from peftc.methods.passes import PASSES
    assert sorted(p.keyword for p in PASSES) == sorted(load_passes())
    assert sorted(p.keyword for p in PASSES) == sorted(METHODS)
