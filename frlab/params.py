"""A notebook's typed `parameters` cell, read without starting a kernel.

Every notebook has one code cell tagged `parameters` (papermill's convention). Each line in it is
an annotated assignment of a literal, optionally followed by the value used in smoke runs:

    steps: int = 400        # smoke: 20; range: [1, inf)
    k: int = 4              # smoke: 2; anything after a semicolon is a note
    margin: float = 0.5     # range: [0, 1.5708]; ArcFace's m
    heads: list[str] = ["arcface", "cosface"]
    run_dir: str = ""       # set by the runner: where metrics.json and figures/ go

A comment is parts separated by semicolons: `smoke: <literal>`, `range: <interval>` (`[lo, hi]`,
either end open with a parenthesis, `inf` for no bound; for a list, each item) and notes.
`read_parameters` returns them in order; `coerce` turns a command-line string into a value of the
declared type or raises `ParameterError` with a message that lists every valid parameter; a value
outside its declared range is refused there too, before any kernel starts.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCALARS = {"int": int, "float": float, "str": str, "bool": bool}
RESERVED = {"run_dir"}  # set by the runner, never by the user
_INTERVAL = re.compile(r"^([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])$")


class ParameterError(ValueError):
    """A parameter that does not exist, or a value that does not fit its declared type."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # "int", "float", "str", "bool" or "list[<scalar>]"
    default: Any
    smoke: Any = None
    has_smoke: bool = False
    range: str = ""  # e.g. "[0, 1.5708]", "(0, inf)"; "" for none

    def check(self, value: Any, where: str = "") -> Any:
        """Return `value` if it fits the declared type (ints are accepted as floats) and range."""
        if self.type.startswith("list["):
            item = Parameter(self.name, self.type[5:-1], None, range=self.range)
            if not isinstance(value, list):
                raise ParameterError(f"{self.name}{where}: expected {self.type}, got {value!r}")
            return [item.check(v, where) for v in value]
        kind = SCALARS[self.type]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not kind:
            raise ParameterError(f"{self.name}{where}: expected {self.type}, got {value!r}")
        if self.range and not in_interval(value, self.range):
            raise ParameterError(f"{self.name}{where}: {value!r} is outside its range {self.range}")
        return value


def in_interval(value: float, interval: str) -> bool:
    """Whether a number lies in an interval written `[lo, hi]` (parentheses for open ends)."""
    m = _INTERVAL.match(interval)
    lo, hi = float(m.group(2)), float(m.group(3))
    above = value >= lo if m.group(1) == "[" else value > lo
    below = value <= hi if m.group(4) == "]" else value < hi
    return above and below


def _comment(text: str, where: str) -> tuple[str | None, str]:
    """(the smoke literal's source or None, the range or "") from a parameter line's comment."""
    smoke, interval = None, ""
    for part in text.lstrip("#").split(";"):
        part = part.strip()
        if part.startswith("smoke:"):
            smoke = part[len("smoke:") :].strip()
        elif part.startswith("range:"):
            interval = part[len("range:") :].strip()
            if not _INTERVAL.match(interval):
                raise ParameterError(f"{where}: range {interval!r} is not an interval like [0, 1] or (0, inf)")
    return smoke, interval


def _annotation(node: ast.expr, src: str) -> str:
    text = ast.get_source_segment(src, node) or ""
    text = text.replace(" ", "")
    if text in SCALARS or (text.startswith("list[") and text.endswith("]") and text[5:-1] in SCALARS):
        return text
    raise ParameterError(f"unsupported parameter type {text!r}; use int, float, str, bool or list[...] of them")


def parameters_cell_index(nb: dict) -> int:
    """Position of the notebook's one cell tagged `parameters`."""
    found = [i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ParameterError(f"expected exactly one cell tagged 'parameters', found {len(found)}")
    return found[0]


def parameters_cell(nb: dict) -> str:
    src = nb["cells"][parameters_cell_index(nb)]["source"]
    return "".join(src) if isinstance(src, list) else src


def parse_parameters(src: str) -> dict[str, Parameter]:
    """Parse the source of a parameters cell into {name: Parameter}."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    params: dict[str, Parameter] = {}
    for stmt in ast.parse(src).body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None):
            line = ast.get_source_segment(src, stmt)
            raise ParameterError(f"parameters cell: every line must be `name: type = literal`, not {line!r}")
        name = stmt.target.id
        lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)  # a formatter may wrap a long one
        smoke_src, interval = _comment(" ; ".join(comments.get(n, "") for n in lines), name)
        kind = _annotation(stmt.annotation, src)
        if interval and kind.removeprefix("list[").removesuffix("]") not in ("int", "float"):
            raise ParameterError(f"{name}: a range is for numbers, not {kind}")
        p = Parameter(name, kind, None, range=interval)
        default = p.check(ast.literal_eval(stmt.value), " (default)")
        smoke = p.check(_literal(smoke_src, f"{name} (smoke)"), " (smoke)") if smoke_src is not None else None
        params[name] = Parameter(name, p.type, default, smoke, smoke_src is not None, interval)
    return params


def _literal(text: str, where: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ParameterError(
            f"{where}: {text!r} is not a Python literal (notes go after a semicolon: `# smoke: 2; note`)"
        ) from None


def read_parameters(path: str | Path) -> dict[str, Parameter]:
    return parse_parameters(parameters_cell(json.loads(Path(path).read_text())))


def describe(params: dict[str, Parameter]) -> str:
    return ", ".join(f"{p.name}: {p.type}" for p in params.values() if p.name not in RESERVED)


def coerce(params: dict[str, Parameter], name: str, text: str) -> Any:
    """Convert a command-line string to the declared type of parameter `name`, within its range."""
    if name not in params or name in RESERVED:
        why = "is set by the runner (use --out)" if name in RESERVED else "is not a parameter"
        raise ParameterError(f"{name!r} {why}; valid parameters: {describe(params)}")
    p = params[name]
    try:
        if p.type == "str":
            value: Any = text
        elif p.type == "bool":
            low = text.strip().lower()
            if low not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError
            value = low in {"true", "1", "yes"}
        elif p.type.startswith("list["):
            value = (
                ast.literal_eval(text)
                if text.strip().startswith("[")
                else [coerce({"x": Parameter("x", p.type[5:-1], None)}, "x", t) for t in text.split(",") if t.strip()]
            )
        else:
            value = ast.literal_eval(text.strip())
        value = Parameter(name, p.type, None).check(value)  # the type, without the range
    except (ValueError, SyntaxError, ParameterError):
        raise ParameterError(f"{name}={text!r} is not a valid {p.type}; valid parameters: {describe(params)}") from None
    return p.check(value)  # the range: its own message
