"""The git commit of a source tree: HEAD, with `+dirty` when tracked files changed. Standard library only, so
that setup.py can load this file by path while it builds a wheel (the package is not installed then)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def tree_commit(root: Path, timeout_s: float = 10) -> str:
    """HEAD of the git checkout at `root` (+dirty), or "" when `root` is not one or git cannot say."""
    if not (root / ".git").exists():
        return ""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=timeout_s)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else ""
