"""The base every costwarden API model shares: camelCase on the wire, strict about typos.

Kubernetes objects are camelCase JSON; Python code reads better in snake_case. Every model
accepts both (``populate_by_name``) and always serializes camelCase, so a model dumped with
``to_wire()`` is exactly what the API server stores. Cross-field rules (``cel_rules``) are
checked here in Python and emitted into the CRD schema as CEL, from one definition.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from costwarden.api.rules import CelRule


class WireModel(BaseModel):
    """A model that maps 1:1 onto a JSON object of the Kubernetes API."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        # Unknown fields are mistakes (a typo in a manifest), never silently ignored: the
        # API server refuses them too (kubectl's strict field validation), so offline
        # validation must.
        extra="forbid",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        self._check_list_keys()
        for rule in type(self).cel_rules:
            if not rule.holds(self):
                raise PydanticCustomError(
                    "cel_rule", rule.message, {"field_path": rule.field_path or ""}
                )
        return self

    def _check_list_keys(self) -> None:
        """Enforce ``x-kubernetes-list-type`` map/set uniqueness, as the API server does."""
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            if not isinstance(extra, dict) or extra.get("x-kubernetes-list-type") not in (
                "map",
                "set",
            ):
                continue
            keys = [str(k) for k in extra.get("x-kubernetes-list-map-keys") or []]  # type: ignore[union-attr]
            seen: set[Any] = set()
            for index, item in enumerate(getattr(self, name) or []):
                key = _list_key(item, keys)
                if key in seen:
                    raise PydanticCustomError(
                        "duplicate",
                        "duplicate value {key}",
                        {
                            "key": str(key[0] if isinstance(key, tuple) else key),
                            "field_path": f".{info.alias or name}[{index}]",
                        },
                    )
                seen.add(key)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if cls.cel_rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.to_schema() for rule in cls.cel_rules]
        return schema

    def to_wire(self) -> dict[str, Any]:
        """The JSON object as the API server would store it (camelCase, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        return cls.model_validate(data)


def _list_key(item: Any, keys: list[str]) -> Any:
    """The identity of a list item: its map keys (list-type map), or itself (set)."""
    if not keys:
        return item
    return tuple(getattr(item, _attr(item, k)) for k in keys)


def _attr(model: BaseModel, alias: str) -> str:
    """The attribute name of a field given its wire name."""
    for name, info in type(model).model_fields.items():
        if info.alias == alias or name == alias:
            return name
    raise KeyError(alias)
