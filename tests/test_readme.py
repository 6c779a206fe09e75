"""The README's Python example stays in step with the public API (it is too slow to run in the suite:
run it by hand after API changes)."""

import ast
import re
from pathlib import Path

import edgetrain

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md lost its Python example"
    return blocks[0]


def dotted(node: ast.AST) -> str | None:
    """'et.training.train_float' for an attribute chain rooted at a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_readme_example_uses_only_existing_public_names() -> None:
    tree = ast.parse(readme_example())
    assert len(readme_example().strip().splitlines()) <= 25
    chains = {dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used = sorted(c for c in chains if c and c.startswith("et."))
    assert "et.quantize" in used and "et.OnlineTrainer" in used
    for chain in used:  # attribute chains on a call result are not rooted at a name: only module paths here
        target = edgetrain
        for attr in chain.split(".")[1:]:
            assert hasattr(target, attr), f"README uses {chain}, which edgetrain does not provide"
            target = getattr(target, attr)
