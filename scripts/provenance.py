"""The commit a benchmark's results belong to, for the JSON it writes.

MAMBATRAIN_COMMIT wins when set: on a remote machine the copied working tree's .git can be stale, so the
launcher passes the commit it copied. Otherwise `git rev-parse HEAD` in the repository root; "unknown" when
neither answers (a benchmark never fails for want of a commit).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit(short: bool = True) -> str:
    """MAMBATRAIN_COMMIT if set, else HEAD of the repository (abbreviated if ``short``), else "unknown"."""
    if os.environ.get("MAMBATRAIN_COMMIT"):
        return os.environ["MAMBATRAIN_COMMIT"]
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        head = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "unknown"
