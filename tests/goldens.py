"""Golden files: a test's expected output, pinned in tests/golden/ and rewritten by `make golden`
(UPDATE_GOLDEN=1), then reviewed as a diff."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def golden(path: Path, got: Any) -> Any:
    """What ``path`` pins (written from ``got`` first under UPDATE_GOLDEN); the test compares."""
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    if not path.exists():
        raise AssertionError(f"missing golden file {path}; run `make golden`")
    return json.loads(path.read_text())
