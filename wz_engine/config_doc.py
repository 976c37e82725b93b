"""Every run-config field with its key, type, default and docstring (`wz config list`).

Field docstrings (the string literal under a dataclass field) are not runtime attributes, so they are
read from the class source with `ast`. Nested sections (dataclass-typed fields) are walked recursively,
whichever module defines them (judge/config.py, rollout/vllm_config.py).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache

from wz_engine.config import RunConfig


@dataclass(frozen=True)
class FieldDoc:
    key: str
    """Dotted key as written in a run file or `--set`, e.g. "optim.lr"."""
    type: str
    default: object
    doc: str
    """The field's docstring ("" when it has none)."""


@cache
def field_docstrings(cls: type) -> dict[str, str]:
    """{field name: docstring} from the class source (a string statement right after the field)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (e.g. a frozen build): no docstrings
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_fields(cls: type = RunConfig, prefix: str = "") -> list[FieldDoc]:
    """Leaf fields of `cls` (declaration order), then its nested sections', flattened to dotted keys."""
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    leaves, sections = [], []
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections += config_fields(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        leaves.append(FieldDoc(key, type_name(tp), default, docs.get(f.name, "")))
    return leaves + sections


def type_name(tp) -> str:
    """A readable type: `int`, `str | None`, `"hf" | "vllm"`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def format_default(value) -> str:
    """A default as it would be written in a TOML run file (None: "unset")."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def format_fields(fields: list[FieldDoc], width: int = 100) -> str:
    """`key = default  (type)` then the indented docstring, sections separated by a `[section]` line."""
    lines, section = [], None
    for f in fields:
        head = f.key.rsplit(".", 1)[0]
        if head != section:
            section = head
            lines += ["" if lines else None, f"[{head}]"]
        lines.append(f"{f.key} = {format_default(f.default)}  ({f.type})")
        for para in f.doc.split("\n\n"):  # source line breaks are not meaningful; blank lines are
            lines += textwrap.wrap(" ".join(para.split()), width, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return "\n".join(line for line in lines if line is not None)
