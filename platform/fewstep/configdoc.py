"""Markdown reference of a pydantic config tree, generated from the field descriptions.

`render(TrainConfig)` walks the model recursively and writes one table per section (dotted key, type with its
bounds, default, description). A field whose type is a union of config classes (the `objective` field, a union
discriminated by `name`) gets one subsection per member class; pass `unions={"objective": [...]}` to give the
member classes explicitly instead of reading them from the annotation (e.g. from an objective registry).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length"),
          ("max_length", "max length"))


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def union_members(annotation: Any) -> list[type[BaseModel]]:
    """The config classes of a union annotation (`A | B`, `Union[A, B]`, `Annotated[A | B, ...]`); [] otherwise."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return []
    members = [_unwrap(a) for a in typing.get_args(annotation)]
    models = [m for m in members if _is_model(m)]
    return models if len(models) > 1 else []


def type_name(annotation: Any) -> str:
    """A readable type: `int`, `float | None`, `list[int]`, `"fp32" | "bf16"`."""
    annotation = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    if inspect.isclass(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def bounds(field: FieldInfo) -> str:
    """`>= 0, <= 1` from the field's constraints (pydantic keeps them as annotated-types metadata)."""
    out = []
    for meta in field.metadata:
        for attr, sign in BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def default_value(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def yaml_value(value: Any) -> str:
    """A default as you would write it in YAML (`null`, `true`, `[1, 2]`)."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


def rows(
    model: type[BaseModel], prefix: str, unions: Mapping[str, Sequence[type]] | None = None
) -> tuple[list[list[str]], list[tuple[str, FieldInfo]]]:
    """Table rows of `model`'s fields, nested config sections flattened into dotted keys; fields that are unions
    of config classes (or keys of `unions`) are returned separately: they get subsections of their own."""
    unions = unions or {}
    table: list[list[str]] = []
    union_fields: list[tuple[str, FieldInfo]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = _unwrap(field.annotation)
        if key in unions or union_members(annotation):
            union_fields.append((key, field))
        elif _is_model(annotation):
            sub_rows, sub_unions = rows(annotation, key + ".", unions)
            table += sub_rows
            union_fields += sub_unions
        else:
            kind = type_name(annotation) + (f" ({b})" if (b := bounds(field)) else "")
            required = field.is_required()
            default = "required" if required else f"`{yaml_value(default_value(field))}`"
            table.append([f"`{key}`", f"`{kind}`", default, field.description or ""])
    return table, union_fields


def table(body: list[list[str]]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]


def discriminator_values(model: type[BaseModel], field: str) -> list[str]:
    info = model.model_fields.get(field)
    if info is None:
        return []
    annotation = _unwrap(info.annotation)
    return [str(a) for a in typing.get_args(annotation)] if typing.get_origin(annotation) is Literal else []


def section(
    model: type[BaseModel], key: str, level: int, intro: str, unions: Mapping[str, Sequence[type]]
) -> list[str]:
    """A heading for `key`, the intro, the model's table, then one subsection per member of each union in it."""
    out = [f"{'#' * level} `{key}`", ""]
    if intro:
        out += [intro, ""]
    body, union_fields = rows(model, f"{key}.", unions)
    if body:
        out += table(body) + [""]
    for ukey, field in union_fields:
        out += union_section(ukey, field, level + 1, unions)
    return out


def union_section(key: str, field: FieldInfo, level: int, unions: Mapping[str, Sequence[type]]) -> list[str]:
    members = list(unions.get(key) or union_members(field.annotation))
    disc = field.discriminator if isinstance(field.discriminator, str) else "name"
    default = default_value(field)
    out = [f"{'#' * level} `{key}`", ""]
    if field.description:
        out += [_cell(field.description), ""]
    out += [f"`{key}.{disc}` selects one of the config classes below; the other fields of `{key}` are those of "
            f"the selected class." + (f" Default: `{key}.{disc}: {getattr(default, disc)}`."
                                      if isinstance(default, BaseModel) and hasattr(default, disc) else ""), ""]
    for member in members:
        values = " | ".join(f"`{v}`" for v in discriminator_values(member, disc)) or f"`{member.__name__}`"
        doc = _doc(member)
        out += [f"{'#' * (level + 1)} `{key}.{disc}`: {values}", "",
                f"`{member.__module__}.{member.__qualname__}`" + (f": {doc}" if doc else ""), ""]
        body, nested = rows(member, key + ".", unions)
        out += table(body) + [""]
        for nkey, nfield in nested:
            out += union_section(nkey, nfield, level + 2, unions)
    return out


def render(
    root: type[BaseModel],
    unions: Mapping[str, Sequence[type[BaseModel]]] | None = None,
    title: str = "Configuration reference",
    preamble: str = "",
) -> str:
    """Markdown for the config tree of `root`: the top-level scalar fields, then one section per top-level
    config section (nested sections flattened into dotted keys), and for each union-typed field (dotted key ->
    member classes in `unions`, else read from the annotation) one subsection per member class."""
    unions = dict(unions or {})
    out = [f"# {title}", ""]
    if preamble:
        out += [preamble.strip(), ""]
    scalars = [n for n, f in root.model_fields.items()
               if not _is_model(_unwrap(f.annotation)) and not union_members(f.annotation) and n not in unions]
    if scalars:
        body = [r for r in rows(root, "", unions)[0] if r[0].strip("`") in scalars]
        out += ["## Top level", "", *table(body), ""]
    for name, field in root.model_fields.items():
        annotation = _unwrap(field.annotation)
        if name in unions or union_members(annotation):
            out += union_section(name, field, 2, unions)
        elif _is_model(annotation):
            intro = _cell(field.description or "") if field.description else ""
            doc = _doc(annotation)
            out += section(annotation, name, 2, " ".join(t for t in (doc, intro) if t), unions)
    return "\n".join(out).rstrip() + "\n"
