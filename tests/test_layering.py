"""The house's floors, bottom up: pipelines/data/ (shards, loader, decode, files) imports neither train/ nor a tool;
models/ is a timm model library (no DeepSpeed); train/ uses both and never one of the tools in pipelines/ built on
top of it (evaluate, benchmark, plot, ...)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[str(path.relative_to(ROOT))] = names
    return out


def is_tool(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "pipelines" and len(parts) > 1 and parts[1] != "data"


def is_above_data(name: str) -> bool:
    return name.split(".")[0] in ("train", "models") or is_tool(name)


def test_train_imports_no_tool():
    assert not {f: sorted(filter(is_tool, names)) for f, names in imported("train").items() if any(map(is_tool, names))}


def test_models_do_not_import_deepspeed():
    assert not {f for f, names in imported("models").items() if any(n.split(".")[0] == "deepspeed" for n in names)}


def test_the_data_library_imports_nothing_above_it():
    found = {f: sorted(filter(is_above_data, names)) for f, names in imported("pipelines/data").items()}
    assert imported("pipelines/data") and not {f: n for f, n in found.items() if n}
