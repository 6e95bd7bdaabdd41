"""Validated, typed, frozen configuration objects for the pipeline stages.

Every stage config derives from :class:`StageConfig`, a frozen pydantic model that rejects
unknown keys (suggesting the closest known one), wrong types and impossible values before any
work starts. Fields are snake_case in Python and may be written camelCase in YAML pipelines
(``coaddName`` or ``coadd_name``), as in LSST pipeline files.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from .errors import ConfigError

__all__ = ["StageConfig"]


class StageConfig(BaseModel):
    """Base class of stage configurations: frozen, strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel,
                              populate_by_name=True, validate_default=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None = None, *, where: str = "config"
                     ) -> Self:
        """Build and validate a config from a mapping (e.g. parsed YAML).

        Parameters
        ----------
        data : mapping, optional
            Field values by snake_case or camelCase name.
        where : str, optional
            Where the values come from, for error messages (e.g. ``"al.yaml: tasks.subtract"``).

        Raises
        ------
        ConfigError
            One message listing every problem, with "did you mean" suggestions.
        """
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as error:
            raise ConfigError(_describe(cls, error, where)) from None

    def replace(self, **changes: Any) -> Self:
        """Return a validated copy with some fields changed."""
        values = self.model_dump()
        values.update(changes)
        return type(self).from_mapping(values, where=f"{type(self).__name__}.replace")

    def to_dict(self) -> dict[str, Any]:
        """Return the fully resolved values (JSON-able, camelCase keys as written in YAML)."""
        return self.model_dump(mode="json", by_alias=True)


def _describe(cls: type[StageConfig], error: ValidationError, where: str) -> str:
    known = sorted({*cls.model_fields, *(f.alias for f in cls.model_fields.values() if f.alias)})
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {known}"
            lines.append(f"unknown key {location!r}{hint}")
        elif item["type"] == "missing":
            lines.append(f"missing required value {location!r}")
        else:
            lines.append(f"{location}: {item['msg']} (got {item.get('input')!r})")
    return f"{where} ({cls.__name__}): " + "; ".join(lines)
