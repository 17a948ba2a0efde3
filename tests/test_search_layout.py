"""search_svc's package layout: a FAISS-only process never loads the Milvus client libraries (the
import rules of every service are in test_architecture.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO_ROOT


FAISS_ONLY = textwrap.dedent(
    """
    import sys

    from prometheus_client import CollectorRegistry

    import search_svc.server
    from search_svc.settings import FaissSettings, SearchSettings

    settings = SearchSettings(backend="faiss", dimension=8, faiss=FaissSettings(data_dir=sys.argv[1]))
    store = search_svc.server.create_store(settings, CollectorRegistry())
    store.open()
    store.close()
    assert "pymilvus" not in sys.modules, "a FAISS-only process imported pymilvus"
    assert "milvus_lite" not in sys.modules, "a FAISS-only process imported milvus_lite"
    """
)


def test_a_faiss_process_does_not_load_pymilvus(tmp_path: Path):
    # A fresh interpreter: this test process may have imported pymilvus through other tests.
    result = subprocess.run(
        [sys.executable, "-c", FAISS_ONLY, str(tmp_path / "faiss")], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "faiss" / "vsearch_images.sqlite3").exists()
