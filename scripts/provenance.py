"""What a benchmark's JSON says about where it ran: the commit, and a header of GPU, date and versions.

MAMBATRAIN_COMMIT wins when set: on a remote machine the copied working tree's .git can be stale, so the
launcher passes the commit it copied. Otherwise `git rev-parse HEAD` in the repository root; "unknown" when
neither answers (a benchmark never fails for want of a commit).
"""

from __future__ import annotations

import datetime
import json
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


def write_record(out_dir: Path, name: str, gpu: str, **fields) -> Path:
    """Write ``{gpu, commit, date, torch, triton, **fields}`` to out_dir/<name>_<gpu tag>.json (h100, h200, or the
    GPU's name); returns the path."""
    import torch
    import triton
    record = dict(gpu=gpu, commit=commit(short=False), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  torch=torch.__version__, triton=triton.__version__, **fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "h100" if "H100" in gpu else "h200" if "H200" in gpu else gpu.replace(" ", "_").lower()
    path = out_dir / f"{name}_{tag}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
