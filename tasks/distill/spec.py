"""The safety spec as data: one policy per category plus a benign policy, versioned and hashed.

Pure: no Prefect, Ray or torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from dafactory.tasks.errors import UserError, first_line
from dafactory.tasks.io.prompts import bundled

BENIGN = "benign"


@dataclass(frozen=True)
class Policy:
    key: str
    title: str
    text: str


@dataclass(frozen=True)
class Spec:
    name: str
    version: str
    sha256: str
    policies: dict[str, Policy]
    categories: dict[str, str]  # prompt category -> policy key
    source: str

    def policy_for(self, category: str) -> Policy:
        key = self.categories.get(category) or self.categories.get(category.strip().lower())
        if key is None:
            raise UserError(
                f"unknown category {category!r}; the spec ({self.source}) knows: {', '.join(sorted(self.categories))}"
            )
        return self.policies[key]

    def render(self) -> str:
        """The full text of every policy, as the teacher reads it."""
        return "\n\n".join(f"## {p.title} ({p.key})\n{p.text.strip()}" for p in self.policies.values())


def load_spec(path: str | None = None) -> Spec:
    if path is None:
        source, raw = "bundled safety_spec.yaml", bundled("safety_spec.yaml").read_bytes()
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"spec file not found: {path}")
        source, raw = str(p), p.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"spec {source} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("policies"), dict):
        raise UserError(f"spec {source} needs a `policies` mapping")
    policies = {}
    for key, body in data["policies"].items():
        if not isinstance(body, dict) or not str(body.get("text", "")).strip():
            raise UserError(f"spec {source}: policy {key!r} needs a non-empty `text`")
        policies[key] = Policy(key, str(body.get("title", key)), str(body["text"]))
    categories = {str(k): str(v) for k, v in (data.get("categories") or {}).items()}
    categories.update({k: k for k in policies if k not in categories})  # a policy key is also a category
    for cat, key in categories.items():
        if key not in policies:
            raise UserError(f"spec {source}: category {cat!r} refers to policy {key!r}, which the spec lacks")
    if BENIGN not in policies:
        raise UserError(f"spec {source} lacks the {BENIGN!r} policy for harmless requests")
    return Spec(
        name=str(data.get("name", "spec")),
        version=str(data.get("version", "unversioned")),
        sha256=hashlib.sha256(raw).hexdigest(),
        policies=policies,
        categories=categories,
        source=source,
    )
