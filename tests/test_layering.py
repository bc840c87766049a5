"""The house's floors: models/ is a timm model library (no DeepSpeed), train/ uses the data side of pipelines/
(shards, data, decode) and never one of the tools built on top of it (evaluate, benchmark, plot, ...)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_SIDE = {"data", "shards", "decode"}


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
    return parts[0] == "pipelines" and len(parts) > 1 and parts[1] not in DATA_SIDE


def test_train_imports_no_tool():
    assert not {f: sorted(filter(is_tool, names)) for f, names in imported("train").items() if any(map(is_tool, names))}


def test_models_do_not_import_deepspeed():
    assert not {f for f, names in imported("models").items() if any(n.split(".")[0] == "deepspeed" for n in names)}
