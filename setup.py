"""Everything about the package is in pyproject.toml; this file only bakes the source's git commit into
built wheels (dafactory/tasks/_commit.txt), so that a dataset's manifest names the code that made it
and never the git repository that happens to surround an installed environment."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def commit() -> str:
    if os.environ.get("DAFACTORY_COMMIT"):  # set by CI systems that build from an exported tree
        return os.environ["DAFACTORY_COMMIT"]
    # the same function the manifest uses for an editable checkout, loaded by path: nothing is installed yet
    spec = importlib.util.spec_from_file_location("gitcommit", HERE / "tasks" / "io" / "gitcommit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tree_commit(HERE)


class BuildPy(build_py):
    def run(self):
        super().run()
        sha = commit()
        if sha and not self.editable_mode:
            Path(self.build_lib, "dafactory", "tasks", "_commit.txt").write_text(sha + "\n")


setup(cmdclass={"build_py": BuildPy})
