"""Where this source checkout is, and the neighbours the tools look for beside it: scripts/, the
Triton virtualenv, and the shared assets (../shared, or VSEARCH_SHARED_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_shared_dir() -> Path:
    """The shared assets (models, datasets): VSEARCH_SHARED_DIR, else ../shared beside the checkout."""
    return Path(os.environ.get("VSEARCH_SHARED_DIR") or REPO_ROOT.parent / "shared")
