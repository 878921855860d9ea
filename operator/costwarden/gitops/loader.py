"""Reading manifests as a reviewer has them: files, folders, stdin, git revisions.

Every YAML stream is read document by document with its line numbers kept, so a problem
can be reported at the line of the field at fault (``file:line``), as an editor or a
GitHub annotation shows it. Multi-document streams (``---``), ``kubectl get -o yaml``
lists (``kind: List``), Kustomize output and ``helm template`` output all read alike;
documents that are not mappings (empty ones, comments only) are skipped.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STDIN = "-"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ReadError(Exception):
    """A source could not be read or parsed: nothing about its objects can be said."""


@dataclass(frozen=True)
class Document:
    """One YAML document: where it came from, its content and its syntax tree (for lines)."""

    source: str
    """The file path as given (or ``<stdin>``, or ``REV:path`` for a git revision)."""
    index: int
    """0-based position of the document in its source (items of a List count apart)."""
    body: dict[str, Any]
    node: yaml.Node

    @property
    def line(self) -> int:
        """1-based line where the document starts."""
        return int(self.node.start_mark.line) + 1

    def line_of(self, field_path: str) -> int:
        """1-based line of ``field_path`` (``spec.rules[0].model``), or of its deepest
        existing ancestor when the field is missing (a required field not written). A
        mapping entry is located at its key, where an editor shows the field."""
        node, located = self.node, self.node
        for part in split_field_path(field_path):
            entry = _entry(node, part)
            if entry is None:
                break
            located, node = entry
        return int(located.start_mark.line) + 1


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_field_path(path: str) -> list[str | int]:
    """``spec.rules[0].model`` → ``["spec", "rules", 0, "model"]``."""
    parts: list[str | int] = []
    for name, index in _PATH_PART.findall(path):
        parts.append(int(index) if index else name)
    return parts


def _entry(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """(where the entry is written, its value): a mapping entry is located at its key."""
    if isinstance(part, int) and isinstance(node, yaml.SequenceNode):
        return (node.value[part], node.value[part]) if part < len(node.value) else None
    if isinstance(part, str) and isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return key, value
    return None


def _child(node: yaml.Node, part: str | int) -> yaml.Node | None:
    entry = _entry(node, part)
    return entry[1] if entry else None


def parse_stream(text: str, source: str) -> list[Document]:
    """Every mapping document of a YAML stream, with ``kind: List`` items unpacked."""
    loader = yaml.SafeLoader(text)
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            body = loader.construct_document(node)
            documents.extend(_unpack(body, node, source, len(documents)))
    except yaml.YAMLError as error:
        raise ReadError(f"{source}: not valid YAML: {error}") from error
    finally:
        loader.dispose()
    return documents


def _unpack(body: Any, node: yaml.Node, source: str, start: int) -> Iterator[Document]:
    if not isinstance(body, dict):
        return
    items = body.get("items")
    if body.get("kind") == "List" and isinstance(items, list):
        item_nodes = _child(node, "items")
        for offset, item in enumerate(items):
            item_node = _child(item_nodes, offset) if item_nodes is not None else None
            if isinstance(item, dict):
                yield Document(source, start + offset, item, item_node or node)
        return
    yield Document(source, start, body, node)


def manifest_files(path: Path) -> list[Path]:
    """A file as it is; a folder's manifests (``.yaml``, ``.yml``, ``.json``), recursively,
    in a stable order, hidden files and folders left out."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ReadError(f"{path}: no such file or directory")
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in MANIFEST_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def load_paths(paths: Iterable[str]) -> list[Document]:
    """The documents of every path (``-`` reads stdin). Raises ReadError on the first
    source that cannot be read or parsed."""
    documents: list[Document] = []
    for raw in paths:
        if raw == STDIN:
            documents.extend(parse_stream(sys.stdin.read(), "<stdin>"))
            continue
        for file in manifest_files(Path(raw)):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ReadError(f"{file}: cannot read: {error}") from error
            documents.extend(parse_stream(text, str(file)))
    return documents
