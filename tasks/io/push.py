"""`dafactory push DIR REPO_ID`: publish a dataset folder's current committed version to the Hugging Face Hub
as one commit (`huggingface_hub`'s create_commit), as distilabel, Data Designer and datatrove do.

What goes up is what a reader of the card needs: the dataset card, `manifest.json` (the version, its config
and accounting) and every file the card lists (compact files and the parts outside them), under the same
paths, so `datasets.load_dataset("<repo id>", "<table>")` reads exactly this version. The per-shard parts
that compact files hold, earlier versions and the commit log stay in the folder. Files of an earlier push
that this version does not list are deleted in the same commit, so the repository is one whole version.
A folder that does not verify (a mismatch, or an incomplete version) is refused.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import yaml

from dafactory.tasks.errors import UserError
from dafactory.tasks.io.manifest import CARD
from dafactory.tasks.io.storage import MANIFEST, DatasetDir


@dataclass
class Upload:
    path_in_repo: str
    local: str  # the file's path in the folder (local or an object store's)
    size: int


def card_files(text: str) -> list[str]:
    """Every data file a dataset card lists (paths in the dataset), in the card's order."""
    front = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else {}
    out: list[str] = []
    for config in (front or {}).get("configs", []):
        for entry in config.get("data_files", []):
            paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            out += [p for p in paths if p not in out]
    return out


def plan_push(ds: DatasetDir) -> tuple[dict, list[Upload]]:
    """(the current version, the files to upload), after checking that the folder verifies."""
    from dafactory.tasks.io.verify import verify

    verdict = verify(ds)
    if verdict.problems or verdict.status != "complete":
        why = "; ".join(verdict.problems[:2]) or f"its current version is {verdict.status}"
        raise UserError(f"refusing to push {ds.uri}: `dafactory verify` does not pass ({why})")
    manifest = ds.read_manifest()
    card = ds.fs.cat(ds._path(CARD)).decode()
    if f"version {manifest['version']}," not in card:
        raise UserError(f"refusing to push {ds.uri}: its dataset card is not version {manifest['version']}'s; "
                        "re-run the build to rewrite it")
    rels = [CARD, MANIFEST, *card_files(card)]
    sizes = ds.concurrently(lambda rel: ds.fs.size(ds._inside(rel)), rels)
    return manifest, [Upload(rel, ds._inside(rel), size) for rel, size in zip(rels, sizes)]


def describe(manifest: dict, uploads: list[Upload], repo_id: str, private: bool, revision: str | None) -> list[str]:
    """The exact operations of a push, one per line (what --dry-run prints)."""
    total = sum(u.size for u in uploads)
    lines = [f"create_repo {repo_id} (repo_type=dataset, private={private}, exist_ok=True)"]
    lines += [f"add {u.path_in_repo} ({u.size} bytes)" for u in uploads]
    lines.append(f"delete every file of {repo_id} under {', '.join(sorted(_folders(uploads)))}/ that is not added")
    lines.append(f"create_commit {repo_id}@{revision or 'main'}: {commit_message(manifest)!r} "
                 f"({len(uploads)} files, {total} bytes)")
    return lines


def commit_message(manifest: dict) -> str:
    return (f"dafactory: {manifest['config']['dataset']} version {manifest['version']} "
            f"(config {manifest['fingerprint']})")


def _folders(uploads: list[Upload]) -> set[str]:
    return {posixpath.dirname(u.path_in_repo) for u in uploads if "/" in u.path_in_repo}


def push(ds: DatasetDir, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> list[str]:
    """Publish the current version (or, with dry_run, only say how); returns the operations."""
    manifest, uploads = plan_push(ds)
    lines = describe(manifest, uploads, repo_id, private, revision)
    if dry_run:
        return lines
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    added = {u.path_in_repo for u in uploads}
    folders = _folders(uploads)
    stale = [f for f in api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
             if posixpath.dirname(f) in folders and f not in added]
    files = [ds.fs.open(u.local, "rb") for u in uploads]  # streamed from the folder, local or remote
    try:
        ops = [CommitOperationAdd(path_in_repo=u.path_in_repo, path_or_fileobj=f) for u, f in zip(uploads, files)]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        api.create_commit(repo_id, operations=ops, commit_message=commit_message(manifest), repo_type="dataset",
                          revision=revision)
    finally:
        for f in files:
            f.close()
    return lines
