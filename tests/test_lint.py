"""The code base stays ruff-clean (the linter is part of the test extra)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes() -> None:
    # ruff is a test dependency: run the one installed with this interpreter (a venv's bin/ need not be on PATH),
    # never skip. A missing ruff fails here with "No module named ruff".
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "birder", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_imports_without_optional_extras() -> None:
    # The public API must import with only the runtime dependencies (no fastapi, pyarrow, matplotlib...).
    code = "import birder, sys; bad = {'fastapi', 'pyarrow', 'matplotlib', 'onnx'} & set(sys.modules); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
