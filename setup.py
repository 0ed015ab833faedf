"""Everything about the package is in pyproject.toml; this file only bakes the source's git commit into
built wheels (dafactory/tasks/_commit.txt), so that a dataset's manifest names the code that made it
and never the git repository that happens to surround an installed environment."""

import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def commit() -> str:
    if os.environ.get("DAFACTORY_COMMIT"):  # set by CI systems that build from an exported tree
        return os.environ["DAFACTORY_COMMIT"]
    here = Path(__file__).resolve().parent
    if not (here / ".git").exists():
        return ""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else ""


class BuildPy(build_py):
    def run(self):
        super().run()
        sha = commit()
        if sha and not self.editable_mode:
            Path(self.build_lib, "dafactory", "tasks", "_commit.txt").write_text(sha + "\n")


setup(cmdclass={"build_py": BuildPy})
