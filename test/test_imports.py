"""The package's modules import each other without cycles: every import statement of every module
of mobilevlm_ros (at the top or inside a function: a deferred import is still a dependency), read
from the source with ast, forms a graph with no cycle. A cycle means two parts each need the other,
and which one a reader should take in first is no longer clear."""
import ast
from pathlib import Path

import mobilevlm_ros

PACKAGE = Path(mobilevlm_ros.__file__).parent


def _modules() -> dict:
    """module name -> its source file, for every .py file of the package."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _imports(name: str, file: Path, modules: dict) -> set:
    """The package's modules that `name` imports (an `from X import y` names module X.y where that is
    a module, else X)."""
    is_pkg = file.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[:len(base) - node.level + 1]
                mod = ".".join(up + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _cycle(graph: dict):
    """One cycle of `graph` as a list of names (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_walk_sees_the_package():
    """The graph is real: it has the modules and the edges a reader sees in the code."""
    modules = _modules()
    graph = {n: _imports(n, f, modules) for n, f in modules.items()}
    assert len(graph) > 40
    assert "mobilevlm_ros.core.decoders.llamacpp_decoder" in graph["mobilevlm_ros.core.pipeline"]  # deferred
    assert "mobilevlm_ros.core.decoders.llama_log" in graph["mobilevlm_ros.core.gguf_export"]
    assert "mobilevlm_ros.engine.engine" in graph["mobilevlm_ros.ros.node"]


def test_cycle_search_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(n, f, modules) for n, f in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
