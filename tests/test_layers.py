"""The package's layers hold: the import-linter contract in pyproject.toml (``[tool.importlinter]``) is kept.

Each layer imports only from its own package or from lower layers (docs/layout.md lists them): collection runs
above the training code, the domain packages (geo, search, introspection) and the per-batch inference code; the
networks, data and files below. A module that imports upward breaks this test, with the offending chain named.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# lint-imports run by this interpreter, from the repository root, so that the birder it analyses is this checkout
_LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_the_layers_contract_is_kept() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LINT_IMPORTS, "--config", "pyproject.toml", "--no-cache", "--no-logo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "1 kept, 0 broken" in report, report
