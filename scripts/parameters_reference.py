"""Write docs/parameters.md: every parameter key with its type, allowed values, default and
description, generated from the schema (``rpo_pipeline.params.GROUPS``) and conf/base.

* type, range and choices: the pydantic field's annotation and constraints;
* default: ``conf/base/parameters_<group>.yml`` (the only place defaults live);
* description: the key's YAML comment in that file (its continuation lines joined), else the
  field's ``Field(description=...)``, else the block's docstring for a block.

    python scripts/parameters_reference.py          # rewrite the page
    python scripts/parameters_reference.py --check  # exit 1 when it is out of date (a test runs this)
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from generated_file import write_or_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "parameters.md"
CONF = ROOT / "conf"
_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.-]+):(?P<rest>.*)$")


def yaml_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment written after it (and on the comment-only lines that follow)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: str | None = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if last is not None and line.index("#") > len(line) - len(line.lstrip()) - 1 and stack:
                comments[last] = (comments.get(last, "") + " " + stripped.lstrip("#").strip()).strip()
            continue
        m = _KEY_LINE.match(line)
        if m is None:
            last = None
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        last = ".".join(k for _, k in stack)
        rest = m["rest"]
        if " #" in rest or rest.strip().startswith("#"):
            comments[last] = rest.split("#", 1)[1].strip()
    return comments


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    for m in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"length >= {m.min_length}")
        if getattr(m, "pattern", None) is not None:
            out.append(f"matches `{m.pattern}`")
    return out


def describe_type(annotation: Any) -> tuple[str, str]:
    """(type, allowed values) of an annotation, e.g. ``("int", ">= 1")``, ``("str", "a | b")``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        t, allowed = describe_type(base)
        extra = []
        for m in meta:
            extra += _constraints(getattr(m, "metadata", []) or [m])
        return t, ", ".join(x for x in [allowed, *extra] if x)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]).__name__, " \\| ".join(json.dumps(c) for c in choices)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        parts = [describe_type(a) for a in args if a is not type(None)]
        t = " or ".join(p[0] for p in parts) + (" or null" if type(None) in args else "")
        return t, "; ".join(p[1] for p in parts if p[1])
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        t, allowed = describe_type(inner[0]) if inner else ("any", "")
        return f"list of {t}", allowed
    if origin is dict:
        return "mapping", ""
    if isinstance(annotation, type):
        return {"NoneType": "null"}.get(annotation.__name__, annotation.__name__), ""
    return str(annotation), ""


def _block(annotation: Any) -> type[BaseModel] | None:
    """The schema class of a nested block (``X`` or ``X | None``), else None."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _default(values: dict[str, Any], dotted: list[str]) -> Any:
    node: Any = values
    for part in dotted:
        if not isinstance(node, dict) or part not in node:
            return "(absent)"
        node = node[part]
    return node


def rows(schema: type[BaseModel], values: dict[str, Any], comments: dict[str, str],
         prefix: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(key, type, allowed, default, description) of every leaf of ``schema``, depth first."""
    out = []
    for name, field in schema.model_fields.items():
        path = [*prefix, name]
        key = ".".join(path)
        note = comments.get(key) or field.description or ""
        block = _block(field.annotation)
        if block is not None and isinstance(_default(values, path[1:]), dict):
            doc = (block.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out.append((key, "block", "", "", note or doc))
            out += rows(block, values, comments, path)
            continue
        t, allowed = describe_type(field.annotation)
        allowed = ", ".join(x for x in [allowed, *_constraints(field.metadata)] if x)
        default = _default(values, path[1:])
        out.append((key, t, allowed, json.dumps(default) if default != "(absent)" else default, note))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\\\\|", "\\|") if text else ""


def render(groups: dict[str, type[BaseModel]] | None = None) -> str:
    from omegaconf import OmegaConf

    from rpo_pipeline.params import GROUPS

    groups = groups if groups is not None else GROUPS
    lines = ["# Parameters reference", "",
             "Every key of every parameter group, generated from the schema (`rpo_pipeline.params`) and",
             "`conf/base` by `scripts/parameters_reference.py`: do not edit by hand. The default is the",
             "value in `conf/base/parameters_<group>.yml`; override one with",
             "`kedro run --params <group>.<key>=<value>` or in an env (`conf/<env>/`). Every key needs a",
             "value: the schema has no defaults of its own. Unknown keys and values outside the allowed",
             "ones fail before any node runs, naming the key.", ""]
    lines += [f"- [`{g}`](#{g})" for g in groups]
    for group, schema in groups.items():
        path = CONF / "base" / f"parameters_{group}.yml"
        values = OmegaConf.to_container(OmegaConf.load(path))[group]
        doc = (schema.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += ["", f"## {group}", "", f"{doc} (`conf/base/parameters_{group}.yml`)", "",
                  "| key | type | allowed | default | description |", "|---|---|---|---|---|"]
        for key, t, allowed, default, note in rows(schema, values, yaml_comments(path), [group]):
            shown = "missing in conf/base" if default == "(absent)" else f"`{default}`" if default else ""
            lines.append(f"| `{key}` | {_cell(t)} | {_cell(allowed)} | {_cell(shown)} | {_cell(note)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return write_or_check(PAGE, render, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
