"""Manifests as they were at a git revision, read with git itself (no checkout, no clone).

Paths are relative to the current directory, as ``git diff REV -- PATH`` takes them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import PurePosixPath

from costwarden.gitops.loader import MANIFEST_SUFFIXES, Document, ReadError, parse_stream


def _git(*args: str, cwd: str | None = None) -> str:
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
        )
    except FileNotFoundError as error:
        raise ReadError("git is not installed") from error
    if result.returncode != 0:
        raise ReadError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def load_revision(revision: str, paths: Sequence[str], cwd: str | None = None) -> list[Document]:
    """The documents of every manifest under ``paths`` at ``revision``."""
    _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", cwd=cwd)
    listed = _git("ls-tree", "-r", "--name-only", revision, "--", *paths, cwd=cwd)
    documents: list[Document] = []
    for name in sorted(filter(None, listed.splitlines())):
        path = PurePosixPath(name)
        if path.suffix not in MANIFEST_SUFFIXES or any(
            p.startswith(".") and p not in (".", "..") for p in path.parts
        ):
            continue
        text = _git("show", f"{revision}:./{name}", cwd=cwd)
        documents.extend(parse_stream(text, f"{revision}:{name}"))
    return documents
