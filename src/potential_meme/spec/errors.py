"""Turn pydantic validation errors into messages that name the field path and what is accepted."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class SpecError(ValueError):
    """A job spec is invalid. `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "job"):
        self.problems = problems
        lines = [f"invalid {source}:"] + [f"  {path}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))

    @classmethod
    def from_validation(cls, root: type[BaseModel], exc: ValidationError, source: str = "job") -> SpecError:
        return cls([_describe(root, error) for error in exc.errors()], source)


class StageError(RuntimeError):
    """A stage cannot run as asked: its output holds another spec's work, or its input is not ready."""


class Preempted(RuntimeError):
    """SIGTERM stopped a stage after it wrote a checkpoint: running it again resumes there."""


def _unwrap(annotation: Any) -> Any:
    """The model class behind Optional[...], list[...], dict[str, ...] and Annotated[...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            models = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            annotation = models[0] if len(models) == 1 else annotation
            if len(models) != 1:
                return annotation
        elif origin in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return annotation


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = root
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            if isinstance(part, int):
                continue
            return None
        fields = {field.alias or name: field for name, field in current.model_fields.items()}
        fields.update(current.model_fields)
        if part not in fields:
            return None
        current = _unwrap(fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _field_at(root: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    parent = _model_at(root, loc[:-1])
    if parent is None:
        return None
    for name, field in parent.model_fields.items():
        if loc[-1] in (name, field.alias):
            return field
    return None


def _describe(root: type[BaseModel], error: dict[str, Any]) -> tuple[str, str]:
    loc = tuple(error["loc"])
    path = ".".join(str(part) for part in loc) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        accepted = sorted(field.alias or name for name, field in parent.model_fields.items()) if parent else []
        message = "unknown field" + (f"; accepted fields: {', '.join(accepted)}" if accepted else "")
    elif error["type"] == "string_pattern_mismatch":
        field = _field_at(root, loc)
        message = f"{field.description if field and field.description else message} (got {error['input']!r})"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] not in ("value_error", "assertion_error") and "input" in error:
        given = error["input"]
        if not isinstance(given, (dict, list)):
            message = f"{message} (got {given!r})"
    return path, message
