"""The configuration reference, ``docs/config.md``, generated from the code that defines the fields.

Every field and default comes from :func:`oefsmc_jax.config_defaults.base_config`; each field's text is the comment
written beside its assignment in ``config_defaults.py`` (``c.x.y = value  # comment``, with the comment-only lines
right below it as continuation, and a comment block standing on its own right above a field as its lead-in). The
per-method sub-configs ``method.NAME.*`` come from the methods' parameter dataclasses, read the same way. A test
checks that the committed file equals this output, so a field or comment changed without regenerating fails::

    python -m oefsmc_jax.config_reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import tokenize
from collections.abc import Iterator
from typing import Any

import ml_collections

from oefsmc_jax import config_defaults

COMMAND = "python -m oefsmc_jax.config_reference > docs/config.md"


@dataclasses.dataclass(frozen=True)
class Field:
    """One assignment of the source: its dotted path (without the root name) and the comment text beside it."""

    path: str
    comment: str


def _comment_rows(source: str) -> tuple[dict[int, str], set[int]]:
    """Row -> comment text (``#`` and surrounding space stripped), and the rows that hold nothing but a comment."""
    comments, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                alone.add(row)
    return comments, alone


def _target_path(node: ast.AST, root: str | None) -> str | None:
    """``a.b.c`` for the target ``ROOT.a.b.c`` (or ``ROOT.a["b"]``), or the bare name when ``root`` is None."""
    if root is None:
        return node.id if isinstance(node, ast.Name) else None
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str):
            parts.append(node.slice.value)
            node = node.value
        else:
            break
    if not (isinstance(node, ast.Name) and node.id == root and parts):
        return None
    return ".".join(reversed(parts))


def field_comments(source: str, body: list[ast.stmt], root: str | None) -> list[Field]:
    """The fields assigned in ``body`` (statements of ``source``, searched recursively) in source order, each with
    its comment: the inline comments on the statement's rows, the comment-only block right below them (continuation
    lines), then a comment-only block right above the statement (its lead-in). A block between two fields is the
    first one's continuation when it touches the first field, which has an inline comment, and does not touch the
    second or the second has an inline comment of its own; otherwise it is the second field's lead-in. ``root`` is
    the name the fields hang on (``c``), or None for a class body's annotated fields."""
    comments, alone = _comment_rows(source)
    stmts = []
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target = node.target
            else:
                continue
            path = _target_path(target, root)
            if path is not None:
                stmts.append((node.lineno, node.end_lineno, path))
    stmts.sort()
    inline = {path: [comments[r] for r in range(first, last + 1) if r in comments and r not in alone]
              for first, last, path in stmts}
    starts = {first: path for first, _, path in stmts}
    used: set[int] = set()
    below: dict[str, list[str]] = {}
    for _, last, path in stmts:
        rows = []
        while last + 1 + len(rows) in alone:
            rows.append(last + 1 + len(rows))
        after = starts.get(last + 1 + len(rows))
        if inline[path] and rows and (after is None or inline[after]):
            used.update(rows)
            below[path] = [comments[r] for r in rows]
    fields = []
    for first, _, path in stmts:
        above, row = [], first - 1
        while row in alone and row not in used:
            above.insert(0, comments[row])
            row -= 1
        parts = [" ".join(inline[path] + below.get(path, [])), " ".join(above)]
        text = ". ".join(re.sub(r"\s+", " ", t).strip().rstrip(".") for t in parts if t.strip())
        fields.append(Field(path, text + ("." if above else "")))
    return fields


def _function_body(module: Any, name: str) -> tuple[str, list[ast.stmt]]:
    source = inspect.getsource(module)
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return source, node.body
    raise LookupError(f"{module.__name__} defines no {name}")


def _value(v: Any) -> str:
    """A default as the command line would take it: strings quoted, tuples and numbers as Python writes them."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def _leaves(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, v in d.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from _leaves(v, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", v


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(field: str, default: str, text: str) -> str:
    return f"| `{_cell(field)}` | `{_cell(default)}` | {_cell(text)} |"


def _rst(text: str, module: Any) -> str:
    """A docstring as markdown: ``x`` becomes `x`, :data:`NAME` its name and value in ``module``."""
    def data(m: re.Match) -> str:
        name = m.group(1).split(".")[-1]
        return f"`{name}` ({_value(getattr(module, name))})" if hasattr(module, name) else f"`{name}`"

    text = re.sub(r":data:`~?([\w.]+)`", data, text)
    text = re.sub(r":\w+:`~?([\w.]+)`", r"`\1`", text)
    return re.sub(r"\s+", " ", text.replace("``", "`")).strip()


HEADER = f"""\
# Configuration reference

<!-- Generated by `{COMMAND}` from `base_config()` and the comments beside each field in
`oefsmc_jax/config_defaults.py` and the methods' parameter dataclasses; do not edit by hand. -->

Every run reads one config: a file of `configs/` with an optional argument, `--config FILE[:ARG]`, whose fields
can each be overridden with `--config.FIELD=VALUE` (e.g. `--config.method.cd.iters=3000`). The shipped configs
take the argument keys {{args}} (e.g. `configs/cifar10.py:method=kd,arch=resnet56,per_class=10,rho=10,oe=1`,
where `oe` is `0`, `1`, `both` or one arm's name); some configs add keys of their own. Every config is validated
before anything loads or compiles, and a bad field fails with one line naming it, such as
`error: config.subset.rho: the imbalance ratio must be >= 1, got 0.5`. Fields marked [choice] are the
implementation choices of `../shared/method.md`.
"""


def markdown() -> str:
    """The whole reference as markdown."""
    source, body = _function_body(config_defaults, "base_config")
    fields = field_comments(source, body, "c")
    config = config_defaults.base_config()
    method_classes = config_defaults.method_param_classes()
    covered = {f.path for f in fields}
    sections: dict[str, list[str]] = {}
    for f in fields:
        if any(p.startswith(f.path + ".") for p in covered):
            continue  # a container (c.data = ConfigDict()): its fields have their own rows
        value = config
        for key in f.path.split("."):
            value = value[key]
        is_dict = isinstance(value, ml_collections.ConfigDict)
        section = f.path.split(".")[0] if "." in f.path or is_dict else ""
        if is_dict:
            default = ", ".join(f"{k}={_value(v)}" for k, v in _leaves(value))
            sections.setdefault(section, []).append(_row(f"{f.path}.*", default, f.comment))
        else:
            sections.setdefault(section, []).append(_row(f.path, _value(value), f.comment))
    missing = [p for p, _ in _leaves(config) if not any(p == c or p.startswith(c + ".") for c in covered)
               and p.split(".")[:2] not in (["method", n] for n in method_classes)]
    if missing:
        raise LookupError(f"config_defaults.base_config: no assignment found for {', '.join(missing)}")

    out = [HEADER.format(args=", ".join(f"`{k}`" for k in config_defaults.COMMON_ARGS))]
    table = ["| field | default | meaning |", "|---|---|---|"]
    for section, rows in sections.items():
        out += [f"## {f'`{section}`' if section else 'Run'}", "", *table, *rows, ""]
        if section == "method":
            out += _method_sections(method_classes, table)
    return "\n".join(out).rstrip() + "\n"


def _method_sections(classes: dict[str, type], table: list[str]) -> list[str]:
    out = []
    for name, cls in classes.items():
        module = sys.modules[cls.__module__]
        source, body = _function_body(module, cls.__name__)
        comments = {f.path: f.comment for f in field_comments(source, body, None)}
        doc = _rst(inspect.getdoc(cls) or "", module)
        out += [f"### `method.{name}`", "", f"`{cls.__name__}` in `{cls.__module__.replace('.', '/')}.py`. {doc}",
                "", *table]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(_row(f"method.{name}.{f.name}", _value(default), comments.get(f.name, "")))
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the reference; ``--check FILE`` instead exits 1 (naming the file) when FILE differs from it."""
    argv = sys.argv[1:] if argv is None else argv
    text = markdown()
    if argv[:1] == ["--check"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as f:
            if f.read() != text:
                print(f"error: {argv[1]} is out of date; regenerate it with `{COMMAND}`", file=sys.stderr)
                return 1
        return 0
    if argv:
        print("usage: python -m oefsmc_jax.config_reference [--check FILE]", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
