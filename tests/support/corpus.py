"""The shared request-smuggling corpus (../shared/smuggling-cases.json), kept in the
repository as tests/data/smuggling-cases.json so that a clean checkout tests every case;
the SMUGGLING_CASES environment variable points at a newer copy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SMUGGLING_CASES = Path(os.environ.get(
    "SMUGGLING_CASES", Path(__file__).resolve().parents[1] / "data" / "smuggling-cases.json"))


def smuggling_cases() -> list[dict[str, Any]]:
    return list(json.loads(SMUGGLING_CASES.read_text())["cases"])
