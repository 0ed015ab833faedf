"""The package's shape: imports go one way, pure cores stay pure, and the installed wheel is complete.

The folders `flows/` and `tasks/` install as `dafactory.flows` and `dafactory.tasks`; nothing named
`flows` or `tasks` may land in site-packages (they would shadow, or be shadowed by, a user's own).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Floors, lowest first: a module may import its own package and the floors below it, never above or
# beside. distill and evaluate are siblings on one floor and must not import each other; so are
# generate and screen.
FLOORS = {"ground": 0, "io": 1, "generate": 2, "screen": 2, "score": 3, "distill": 4, "evaluate": 4, "run": 5, "flows": 6}
# Modules that may import Prefect, Ray or torch at the top: the machinery that runs work, and flows.
HEAVY_OK = {"run", "flows"}
HEAVY = ("prefect", "ray", "torch", "transformers")
BAKED = "0123456789abcdef0123456789abcdef01234567"  # the commit a CI system names when it builds the wheel


def _modules():
    for folder, prefix in (("tasks", "dafactory.tasks"), ("flows", "dafactory.flows")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            yield path, ".".join((prefix, *rel)).removesuffix(".__init__")


def _floor(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "flows":
        return "flows"
    return parts[2] if len(parts) > 3 and parts[2] in FLOORS else "ground"


def _imports(path: Path, top_level_only: bool = False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_imports_go_one_way():
    wrong = []
    for path, module in _modules():
        here = _floor(module)
        for name in _imports(path):
            if name.split(".")[0] in ("tasks", "flows"):
                wrong.append(f"{module} imports {name}: use dafactory.{name}")
            if not name.startswith("dafactory."):
                continue
            there = _floor(name)
            if there != here and FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{module} ({here}) imports {name} ({there})")
    assert wrong == []


def test_the_config_models_import_nothing_of_ours_but_errors():
    ours = [n for n in _imports(ROOT / "tasks" / "config.py") if n.startswith("dafactory")]
    assert ours == ["dafactory.tasks.errors"]


def test_pure_cores_import_no_heavy_library_at_the_top():
    wrong = [f"{module} imports {name}" for path, module in _modules() if _floor(module) not in HEAVY_OK
             for name in _imports(path, top_level_only=True) if name.split(".")[0] in HEAVY]
    assert wrong == []


def test_pure_cores_load_without_prefect_ray_or_torch():
    # In a fresh interpreter, importing every stage package's pure modules pulls in none of them.
    code = (
        "import sys\n"
        "import dafactory.tasks.io.prompts, dafactory.tasks.io.storage, dafactory.tasks.io.verify\n"
        "import dafactory.tasks.score.selection, dafactory.tasks.score.strategies\n"
        "import dafactory.tasks.distill.filtering, dafactory.tasks.screen.ngram, dafactory.tasks.evaluate.benchmarks\n"
        "import dafactory.tasks.screen.rules, dafactory.tasks.screen.minhash, dafactory.tasks.screen.embed\n"
        "import dafactory.tasks.generate.generation, dafactory.tasks.generate.backends.fake\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tracked files (no network: the venv's setuptools)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DAFACTORY_COMMIT": BAKED})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("dafactory-*.whl")
    return whl


def test_the_wheel_holds_only_dafactory_and_every_file_the_code_opens(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    info = [n for n in names if ".dist-info/" in n]
    assert sorted({n.split("/")[0] for n in names if n not in info}) == ["dafactory"]
    # setuptools writes top_level.txt: the wheel's only top-level package is dafactory
    (top_level,) = [n for n in info if n.endswith("top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["dafactory"]
    assert zipfile.ZipFile(wheel).read("dafactory/tasks/_commit.txt").decode() == BAKED + "\n"
    data = sorted(p.name for p in (ROOT / "tasks" / "data").iterdir())
    assert sorted(n.removeprefix("dafactory/tasks/data/") for n in names if n.startswith("dafactory/tasks/data/")) == data
    sources = sorted(f"dafactory/{m.split('.', 1)[1].replace('.', '/')}" for _, m in _modules())
    packaged = {n.removesuffix(".py").removesuffix("/__init__") for n in names if n.endswith(".py")}
    assert [s for s in sources if s not in packaged] == []


@pytest.mark.slow
def test_installed_wheel_runs_both_flows_outside_the_checkout(wheel, tmp_path):
    # A fresh venv with the wheel, not editable. Its dependencies come from this venv's site-packages
    # through a .pth line; that folder's own .pth files (the editable finder) are not read from there.
    # the environment sits inside a git repository of the user's own, whose commit is not ours
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q",
                    "--allow-empty", "-m", "theirs"], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}

    def run(*args, timeout=600):
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    assert run(str(py), "-c", "import tasks").returncode == 1
    assert run(str(py), "-c", "import flows").returncode == 1
    found = run(str(py), "-c", "import dafactory.tasks.config, dafactory.flows.cli; print(dafactory.tasks.config.__file__)")
    assert found.returncode == 0 and found.stdout.startswith(site), found.stderr[-2000:]

    shown = run(str(py), "-c", "from dafactory.tasks.io.manifest import code_version; print(code_version())")
    assert shown.stdout.strip() == str({"package": "dafactory", "version": "0.1.0", "git_commit": BAKED})

    exe = str(venv / "bin" / "dafactory")
    distill = run(exe, "run", "distill", "--set", "teacher.backend=fake", "--set", "prompts.path=distill_sample",
                  "--set", "prompts.category_column=category",
                  "--set", f"output={work / 'out'}")
    assert distill.returncode == 0, distill.stderr[-3000:]
    assert f"dataset: {work / 'out'}/distill" in distill.stdout
    preference = run(exe, "run", "preference", "--set", "student.backend=fake", "--set", f"output={work / 'out'}")
    assert preference.returncode == 0, preference.stderr[-3000:]
    assert f"dataset: {work / 'out'}/preference" in preference.stdout
    assert run(exe, "verify", str(work / "out" / "distill")).returncode == 0
