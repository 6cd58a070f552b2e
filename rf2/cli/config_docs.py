"""Every config key, explained from one source: the typed schema in ``rf2.core.config``.

Each key's type and default come from the dataclass field, its allowed values from the
``Literal`` type and the ``check(...)`` calls of the dataclass's ``validate``, and its
description from the comment above (or beside) the field. From that one list this
module renders ``docs/config.md`` and the key list of ``rf2 --help`` (Hydra's help
template, ``conf/hydra/help/rf2.yaml``); ``rf2 --help PREFIX`` prints the keys under a
prefix. ``tests/test_config_docs.py`` fails when either file drifts from the schema:

    python -m rf2.cli.config_docs --write     # regenerate docs/config.md and the help
    python -m rf2.cli.config_docs --check     # exit 1 if they are out of date
    python -m rf2.cli.config_docs model.index # the keys under a prefix
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rf2.core import config as schema
from rf2.core.typed import _type_name, to_dict

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "config.md"
HELP = REPO / "conf" / "hydra" / "help" / "rf2.yaml"


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted path, e.g. model.index.beam; list items as fault_injection[].kind
    type: str
    default: Any
    allowed: str  # what validation accepts ("" when the type says it all)
    description: str  # the field's comment, joined into one paragraph

    @property
    def summary(self) -> str:
        """The description's first sentence (one line of ``rf2 --help``)."""
        first = re.split(r"(?<=[.])\s+(?=[A-Z0-9(`\"'])", self.description, maxsplit=1)[0]
        return first.rstrip(".")


@dataclass(frozen=True)
class Section:
    name: str  # "" = top-level keys
    doc: str  # the dataclass docstring's first paragraph
    group: list[tuple[str, str]]  # Hydra group options: (name, first comment line)
    keys: list[KeyDoc]


# -- reading the schema's source ------------------------------------------------------------

def _comments(source: str) -> dict[int, str]:
    """Line number -> comment text (without '#'), for every comment in ``source``."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _render_allowed(node: ast.expr) -> str:
    """The text of a ``check(..., allowed)`` argument; f-string parts that depend on the
    instance (``{self.levels}``) become ``{levels}``, module constants are filled in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                expr = ast.unparse(value.value)
                try:
                    parts.append(str(eval(expr, vars(schema))))  # noqa: S307 - our own source
                except Exception:  # depends on the instance or the data
                    parts.append("{" + expr.replace("self.", "") + "}")
        return "".join(parts)
    return ast.unparse(node)


def _checked_name(node: ast.expr) -> str | None:
    """The field a ``check`` call names: f"{path}.NAME" -> NAME; "a.b" -> "a.b"."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and len(node.values) == 2:
        tail = node.values[1]
        if isinstance(tail, ast.Constant) and str(tail.value).startswith("."):
            return str(tail.value)[1:]
    return None


@dataclass
class _ClassSource:
    descriptions: dict[str, str]
    allowed: dict[str, list[str]]
    doc: str


def _read_class(cls: type, source: str, comments: dict[int, str]) -> _ClassSource:
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    descriptions: dict[str, str] = {}
    allowed: dict[str, list[str]] = {}
    previous_end = node.lineno
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            above: list[str] = []
            line = stmt.lineno - 1
            while line > previous_end and line in comments:
                above.insert(0, comments[line])
                line -= 1
            end = stmt.end_lineno or stmt.lineno  # always set by ast.parse
            beside = [comments[n] for n in range(stmt.lineno, end + 1)
                      if n in comments]
            text = " ".join([*above, *beside]).strip()
            if text:
                descriptions[stmt.target.id] = text
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "validate":
            for call in ast.walk(stmt):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                        and call.func.id == "check" and len(call.args) == 4):
                    name = _checked_name(call.args[1])
                    if name:
                        allowed.setdefault(name, []).append(_render_allowed(call.args[3]))
        previous_end = stmt.end_lineno or stmt.lineno
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    if doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature: no docstring
        doc = ""
    return _ClassSource(descriptions, allowed, doc)


def _group_options(group: str) -> list[tuple[str, str]]:
    """A Hydra group's options and the first line of each YAML's leading comment."""
    root = resources.files("rf2.conf") / group
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        first = ""
        for line in entry.read_text(encoding="utf-8").splitlines():
            text = line.lstrip("#").strip()
            if not line.startswith("#"):
                break
            if text and not text.startswith("@package"):
                first = text
                break
        out.append((entry.name[:-5], first))
    return out


def _fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls, vars(schema))
    for f in dataclasses.fields(cls):
        yield f, hints[f.name]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _nested_dataclass(tp: Any) -> tuple[type | None, bool]:
    """(dataclass, is_list) when ``tp`` is a dataclass or a list of one."""
    if dataclasses.is_dataclass(tp):
        return tp, False  # type: ignore[return-value]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(item):
            return item, True  # type: ignore[return-value]
    return None, False


def sections() -> list[Section]:
    """Every key of ``RunConfig``, grouped by the dataclass it lives in."""
    source = inspect.getsource(schema)
    comments = _comments(source)
    root = _read_class(schema.RunConfig, source, comments)
    out: list[Section] = []

    def walk(cls: type, prefix: str, info: _ClassSource, name: str, doc: str,
             outer: _ClassSource | None) -> None:
        keys: list[KeyDoc] = []
        children = []
        for f, tp in _fields(cls):
            nested, is_list = _nested_dataclass(tp)
            key = f"{prefix}{f.name}"
            if nested is not None:
                child = _read_class(nested, source, comments)
                children.append((nested, key + ("[]." if is_list else "."), child, key,
                                 info.descriptions.get(f.name, "") or child.doc))
                continue
            allowed = list(info.allowed.get(f.name, []))
            if outer is None:  # RunConfig.validate checks nested keys by their full path
                allowed += root.allowed.get(key, []) if prefix else []
            else:
                allowed += root.allowed.get(key, [])
            choices = typing.get_origin(tp) is typing.Literal
            keys.append(KeyDoc(key=key, type=_type_name(tp), default=_default(f),
                               allowed="; ".join(dict.fromkeys(allowed)) if not choices else
                               "; ".join(dict.fromkeys(allowed)),
                               description=info.descriptions.get(f.name, "")))
        group = _group_options(name) if name else []
        out.append(Section(name, doc, group, keys))
        for nested, child_prefix, child, child_name, child_doc in children:
            walk(nested, child_prefix, child, child_name, child_doc, info)

    walk(schema.RunConfig, "", root, "", "", None)
    return out


def all_keys() -> list[KeyDoc]:
    return [k for s in sections() for k in s.keys]


# -- rendering ------------------------------------------------------------------------------

def _yaml_value(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_dict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from rf2/core/config.py by `python -m rf2.cli.config_docs --write`;",
        "     tests/test_config_docs.py fails when it drifts. Edit the schema's comments, not",
        "     this file. -->",
        "",
        "Every key of a run, its type, default, allowed values and meaning. Set a key with",
        "`rf2 KEY=VALUE` (e.g. `rf2 model.index.beam=32`); swap a whole group with",
        "`rf2 GROUP=OPTION` (e.g. `rf2 model=two_tower`): the group's YAML file in `conf/`",
        "sets only what differs from these defaults. `rf2 --help` lists the keys in short,",
        "`rf2 --help PREFIX` only those under a prefix (`rf2 --help model.index`). Bad values",
        "stop a run before anything starts, with one line naming the key and what is allowed.",
        "",
    ]
    all_sections = sections()
    lines.append("Sections: " + ", ".join(
        f"[`{s.name}`](#{s.name.replace('[]', '').replace('.', '')})" if s.name else
        "[top level](#top-level)" for s in all_sections) + ".")
    lines.append("")
    for s in all_sections:
        lines.append(f"## {s.name}" if s.name else "## Top level")
        lines.append("")
        if s.doc:
            lines += [s.doc, ""]
        if s.group:
            lines.append(f"Options of `{s.name}=` (files in `conf/{s.name}/`):")
            lines.append("")
            for option, first in s.group:
                lines.append(f"- `{option}`" + (f": {first}" if first else ""))
            lines.append("")
        lines.append("| key | type | default | allowed | description |")
        lines.append("|---|---|---|---|---|")
        for k in s.keys:
            lines.append(f"| `{k.key}` | {_cell(k.type)} | `{_cell(_yaml_value(k.default))}` | "
                         f"{_cell(k.allowed)} | {_cell(k.description)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def key_lines(prefix: str = "") -> list[str]:
    """One line per key under ``prefix``: key, type, default, first sentence."""
    keys = [k for k in all_keys() if not prefix or k.key == prefix
            or k.key.startswith(prefix.rstrip(".") + ".")
            or k.key.startswith(prefix.rstrip(".") + "[]")]
    width = max((len(k.key) for k in keys), default=0)
    out = []
    for k in keys:
        out.append(f"  {k.key:<{width}}  = {_yaml_value(k.default)}  ({k.type})")
        if k.summary:
            out.append(textwrap.fill(k.summary, 96, initial_indent="      ",
                                     subsequent_indent="      "))
    return out


def help_template() -> str:
    """Hydra's help template for ``rf2 --help`` ($APP_CONFIG_GROUPS: Hydra fills it in)."""
    return "\n".join([
        "rf2: federated learning for recommendation on Flower + Ray, configured with Hydra.",
        "",
        "Usage: rf2 [GROUP=OPTION ...] [KEY=VALUE ...]      one run (outputs/<date>/<time>/)",
        "       rf2 -m KEY=A,B ...                          a sweep, one job per combination",
        "       rf2 resume=RUN_FOLDER                       continue a stopped run",
        "       rf2 --help PREFIX                           only the keys under PREFIX",
        "       rf2 --cfg job [overrides]                   the composed config",
        "",
        "== Config groups (GROUP=OPTION; +experiment=NAME adds a study) ==",
        "$APP_CONFIG_GROUPS",
        "",
        "== Keys (default and type; every key with its allowed values: docs/config.md) ==",
        *key_lines(),
        "",
    ])


def help_yaml() -> str:
    header = ("# Generated by `python -m rf2.cli.config_docs --write` from rf2/core/config.py\n"
              "# (tests/test_config_docs.py checks it): the text of `rf2 --help`.\n"
              "# @package hydra.help\n")
    body = {"app_name": "rf2", "header": "", "footer": "", "template": help_template()}
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=10**6)


def narrowed_help(prefix: str) -> list[str] | None:
    """``rf2 --help PREFIX``: the group's options (for a group) and its keys; None when
    no key starts with ``prefix``."""
    lines = key_lines(prefix)
    if not lines:
        return None
    out: list[str] = []
    for s in sections():
        if s.name == prefix.rstrip(".") and s.group:
            out.append(f"{prefix}= options (conf/{s.name}/):")
            out += [f"  {name:<24} {first}" for name, first in s.group]
            out.append("")
    out.append(f"Keys under {prefix} (default and type):")
    return out + lines


# -- command --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rf2.cli.config_docs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("prefix", nargs="?", help="print the keys under this prefix")
    parser.add_argument("--write", action="store_true", help="regenerate docs/config.md and "
                        "conf/hydra/help/rf2.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if they are out of date")
    args = parser.parse_args(argv)
    wanted = {DOCS: render_markdown(), HELP: help_yaml()}
    if args.write:
        for path, text in wanted.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0
    if args.check:
        stale = [str(p) for p, text in wanted.items()
                 if not p.exists() or p.read_text(encoding="utf-8") != text]
        for stale_path in stale:
            print(f"{stale_path} is out of date: run python -m rf2.cli.config_docs --write",
                  file=sys.stderr)
        return 1 if stale else 0
    lines = narrowed_help(args.prefix) if args.prefix else render_markdown().splitlines()
    if lines is None:
        print(f"no config key starts with {args.prefix!r}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
