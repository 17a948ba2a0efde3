"""The committed generated code is exactly what the pinned generator produces from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run(
        [str(REPO_ROOT / "scripts/gen-protos"), str(tmp_path)],
        check=True, capture_output=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "vsearch/v1").iterdir())
    committed = sorted(
        p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "vsearch/v1").iterdir()
        if p.name != "__init__.py" and p.is_file()
    )
    assert generated == committed, "generated file set differs: run `make protos`"
    drifted = [str(p) for p in generated if (tmp_path / p).read_bytes() != (REPO_ROOT / p).read_bytes()]
    assert not drifted, f"committed stubs differ from protos/: {drifted}; run `make protos`"
