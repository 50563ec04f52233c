"""`torpor.store` imports nothing by itself: a worker that uses the chunk store alone loads no
database code (the package's docstring promises it; its lazy re-exports are gone, issue 13).
A guard, not a finding: main's lazy re-exports kept this too."""

from __future__ import annotations

import subprocess
import sys


def test_the_chunk_store_imports_no_database_code() -> None:
    probe = (
        "import sys, torpor.store, torpor.store.chunks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sqlalchemy', 'alembic', 'torch', 'psycopg')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
