"""The project's modules import each other without a circle (lazy imports inside functions included): each
component builds on those below it (model <- generate <- fusion <- lora <- train), never the other way."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(root: Path) -> dict:
    modules = {p.stem: p for p in root.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add(node.module.split(".")[0])
        graph[name] = (deps & set(modules)) - {name}
    return graph


def circles(graph: dict) -> list:
    """Modules that can reach themselves."""
    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen
    return sorted(m for m in graph if m in reach(m))


def test_no_import_circle(tmp_path):
    graph = import_graph(ROOT)
    assert {"train", "fusion", "lora", "model", "generate"} <= set(graph) and circles(graph) == []
    # negative control: the circle this project once had (model.py importing generate.py lazily)
    (tmp_path / "model.py").write_text("def f():\n    import generate\n")
    (tmp_path / "generate.py").write_text("from model import f\n")
    assert circles(import_graph(tmp_path)) == ["generate", "model"]
