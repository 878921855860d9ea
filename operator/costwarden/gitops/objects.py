"""Which documents are costwarden objects, and who they are (kind, namespace, name).

Other documents (Namespaces, Deployments, a chart's whole output) pass through unseen:
a GitOps folder holds much more than budgets. An object's envelope is checked as the API
server checks it before the schema: a known kind and version, a valid name, a spec, and
no unknown top-level fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from costwarden.api import routingpolicy, teambudget
from costwarden.api.meta import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, GROUP, VERSION
from costwarden.gitops.loader import Document
from costwarden.policy.render import ObservedObject
from costwarden.policy.validation import Problem

KINDS = (teambudget.KIND, routingpolicy.KIND)
TOP_LEVEL_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}
DEFAULT_NAMESPACE = "default"
_NAME = re.compile(DNS_SUBDOMAIN_PATTERN)
_NAMESPACE = re.compile(DNS_LABEL_PATTERN)


@dataclass(frozen=True)
class ManifestObject:
    """A costwarden object read from a document."""

    document: Document
    kind: str
    namespace: str
    name: str

    @property
    def id(self) -> str:
        """``namespace/name``, the id the operator and the gateway configuration use."""
        return f"{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        """``Kind namespace/name``, how a reader names the object."""
        return f"{self.kind} {self.id}"

    @property
    def spec(self) -> Any:
        return self.document.body.get("spec")

    def observed(self) -> ObservedObject:
        """The object as the operator would observe it after ``kubectl apply``."""
        metadata = self.document.body.get("metadata") or {}
        generation = metadata.get("generation") if isinstance(metadata, dict) else None
        status = self.document.body.get("status")
        return ObservedObject(
            namespace=self.namespace,
            name=self.name,
            generation=generation if isinstance(generation, int) else 1,
            spec=self.spec if isinstance(self.spec, dict) else {},
            status=status if isinstance(status, dict) else {},
        )


def namespace_manifests(documents: Iterable[Document]) -> list[dict[str, Any]]:
    """The Namespace manifests among the documents: their ``costwarden.io/budget``
    annotations carry a cluster admin's consent (policy.tenancy)."""
    return [
        d.body
        for d in documents
        if d.body.get("apiVersion") == "v1"
        and d.body.get("kind") == "Namespace"
        and isinstance(d.body.get("metadata"), dict)
    ]


def is_costwarden(document: Document) -> bool:
    api_version = document.body.get("apiVersion")
    return isinstance(api_version, str) and api_version.split("/")[0] == GROUP


def read_objects(
    documents: Iterable[Document], default_namespace: str = DEFAULT_NAMESPACE
) -> list[ManifestObject]:
    """The costwarden objects among the documents, in their order."""
    objects = []
    for document in documents:
        if not is_costwarden(document):
            continue
        metadata = document.body.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        objects.append(
            ManifestObject(
                document=document,
                kind=str(document.body.get("kind", "")),
                namespace=str(metadata.get("namespace") or default_namespace),
                name=str(metadata.get("name") or ""),
            )
        )
    return objects


def envelope_problems(obj: ManifestObject) -> list[Problem]:
    """What is wrong around the spec; an object with such a problem is not checked further."""
    body = obj.document.body
    problems = []
    if body.get("apiVersion") != f"{GROUP}/{VERSION}":
        problems.append(
            Problem("apiVersion", f"must be {GROUP}/{VERSION}, not {body.get('apiVersion')!r}")
        )
    if obj.kind not in KINDS:
        problems.append(
            Problem("kind", f"must be one of {', '.join(KINDS)}, not {body.get('kind')!r}")
        )
    metadata = body.get("metadata")
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    if not obj.name:
        problems.append(Problem("metadata.name", "Required value"))
    elif len(obj.name) > 253 or not _NAME.match(obj.name):
        problems.append(
            Problem("metadata.name", f"{obj.name!r} is not a valid name (RFC 1123 subdomain)")
        )
    if namespace is not None and not (isinstance(namespace, str) and _NAMESPACE.match(namespace)):
        problems.append(
            Problem(
                "metadata.namespace", f"{namespace!r} is not a valid namespace (RFC 1123 label)"
            )
        )
    for key in sorted(set(body) - TOP_LEVEL_FIELDS):
        problems.append(Problem(key, f'unknown field "{key}"'))
    if "spec" not in body:
        problems.append(Problem("spec", "Required value"))
    elif not isinstance(body["spec"], dict):
        problems.append(Problem("spec", "must be an object"))
    return problems
