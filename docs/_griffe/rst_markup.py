"""Griffe extension for the docs build: the reST markup in this package's docstrings, as Markdown.

The docstrings are Google style (``Args:``, ``Returns:``) but use a few reST constructs that
Markdown does not know. Before mkdocstrings parses a docstring, this extension rewrites:

- ``:math:`x``` into ``$x$`` and a ``.. math::`` directive into a ``$$ ... $$`` block (rendered by
  ``pymdownx.arithmatex``);
- ``:func:`name```, ``:class:`~pkg.mod.Name``` and the other Python roles into links to the
  API reference when the name resolves inside the package, and into inline code otherwise;
- a literal block introduced by ``::`` into a fenced code block;
- a reST simple table (``====  ====`` borders) into a Markdown table;
- a grouped entry ``a, b, c: description`` of an ``Args:`` section into one entry per name.

It changes what the docs site shows, never the package. Loaded from ``mkdocs.yml`` by path.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(math|func|meth|class|mod|data|attr|exc|obj|const):`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*$")
_TABLE_BORDER = re.compile(r"^\s*=+(?: +=+)+\s*$")
_ARGS_HEADER = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Params):\s*$")
_GROUPED_ARG = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
_CALLABLE_ROLES = {"func", "meth"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, base: int) -> int:
    """Index after the indented block (deeper than ``base``) that begins at or after ``start``."""
    end = start
    last = start
    while end < len(lines):
        line = lines[end]
        if line.strip():
            if _indent(line) <= base:
                break
            last = end + 1
        end += 1
    return max(last, start)


def _dedent(lines: list[str]) -> list[str]:
    width = min((_indent(line) for line in lines if line.strip()), default=0)
    return [line[width:] for line in lines]


def _directives(lines: list[str]) -> list[str]:
    """``.. math::`` blocks and ``::`` literal blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        math = _MATH_DIRECTIVE.match(line)
        literal = not math and line.rstrip().endswith("::") and not line.lstrip().startswith("..")
        if not (math or literal):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        end = _block_end(lines, i + 1, base)
        body = _dedent([text for text in lines[i + 1 : end]])
        while body and not body[0].strip():
            body.pop(0)
        pad = " " * base
        if math:
            out += [f"{pad}$$", *(f"{pad}{text}" if text.strip() else "" for text in body), f"{pad}$$"]
        else:
            head = line.rstrip()[:-1]  # "Example::" -> "Example:", "text::" -> "text:"
            if head.strip() == ":":
                head = ""
            if head:
                out += [head, ""]
            shell = body and body[0].lstrip().startswith(("python ", "pip ", "$ "))
            fence = f"{pad}```{'bash' if shell else 'python'}"
            out += [fence, *(f"{pad}{text}" if text.strip() else "" for text in body), f"{pad}```"]
        out.append("")
        i = end
    return out


def _table_rows(segment: list[str], starts: list[int]) -> list[list[str]]:
    """Cells of the rows of a simple table; a line with an empty first cell continues the row above."""
    bounds = [*starts[1:], None]
    rows: list[list[str]] = []
    for line in segment:
        if not line.strip():
            continue
        cells = [line[a:b].strip() if len(line) > a else "" for a, b in zip(starts, bounds, strict=True)]
        if rows and not cells[0]:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


def _escape_math_bars(cell: str) -> str:
    """A "|" inside math would split a Markdown table cell: write it as ``\\vert``."""
    return re.sub(r":math:`([^`]*)`", lambda m: ":math:`" + m[1].replace("|", r"\vert ") + "`", cell)


def _tables(lines: list[str]) -> list[str]:
    """reST simple tables (border, header, border, rows, border) into Markdown tables."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        starts = [m.start() for m in re.finditer(r"=+", border)]
        borders = [j for j in range(i, len(lines)) if lines[j].strip() == border.strip()]
        if len(borders) < 3:
            out.append(lines[i])
            i += 1
            continue
        top, middle, bottom = borders[0], borders[1], borders[2]
        pad = " " * _indent(border)
        header = _table_rows(lines[top + 1 : middle], starts)
        body = _table_rows(lines[middle + 1 : bottom], starts)
        rows = [header[0] if header else [""] * len(starts), *header[1:], *body]
        markdown = [pad + "| " + " | ".join(_escape_math_bars(c) for c in row) + " |" for row in rows]
        out += ["", markdown[0], pad + "|" + "|".join(" --- " for _ in starts) + "|", *markdown[1:], ""]
        i = bottom + 1
    return out


def _grouped_args(lines: list[str]) -> list[str]:
    """``a, b: text`` in an ``Args:`` section -> ``a: text`` and ``b: text``."""
    out: list[str] = []
    section: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _ARGS_HEADER.match(line)
        if header:
            section = _indent(line)
            out.append(line)
            i += 1
            continue
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        grouped = _GROUPED_ARG.match(line) if section is not None else None
        if not grouped:
            out.append(line)
            i += 1
            continue
        end = _block_end(lines, i + 1, _indent(line))
        continuation = lines[i + 1 : end]
        names = [n.strip() for n in grouped[2].split(",")]
        for name in names:
            out.append(f"{grouped[1]}{name}{grouped[3] or ''}:{grouped[4] or ''}")
            out += continuation
        i = end
    return out


class _Roles:
    """Rewrites reST roles for one object, resolving names in that object's scope."""

    def __init__(self, obj: griffe.Object, package: griffe.Module) -> None:
        self.obj = obj
        self.package = package

    def lookup(self, path: str) -> griffe.Object | None:
        """The object at a dotted path inside the package (aliases followed), or None."""
        parts = path.split(".")
        if parts[0] != self.package.name:
            return None
        current: Any = self.package
        for part in parts[1:]:
            for _ in range(10):
                if not current.is_alias:
                    break
                current = self.lookup(current.target_path)
                if current is None:
                    return None
            if part not in current.members:
                return None
            current = current.members[part]
        for _ in range(10):
            if not current.is_alias:
                return current
            current = self.lookup(current.target_path)
            if current is None:
                return None
        return None

    def resolve(self, target: str) -> str | None:
        """The canonical path of ``target`` if it lives in the package, else None."""
        first, _, rest = target.partition(".")
        if first == self.package.name:
            path = target
        else:
            try:
                path = self.obj.resolve(first)
            except (griffe.NameResolutionError, AttributeError, KeyError):
                return None
            path = f"{path}.{rest}" if rest else path
        found = self.lookup(path)
        return found.path if found is not None else None

    def __call__(self, match: re.Match[str]) -> str:
        role, text = match[1], match[2]
        if role == "math":
            return f"${text.strip()}$"
        title, explicit = text, None
        if (labelled := re.fullmatch(r"(.*?)\s*<([^>]+)>", text)) is not None:
            title, explicit = labelled[1], labelled[2]
        target = (explicit or text).lstrip("~.")
        if explicit is None:
            title = target.rpartition(".")[2] if text.startswith("~") else target
            if role in _CALLABLE_ROLES:
                title += "()"
        path = self.resolve(target)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'


def rewrite(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    """The docstring ``text`` of ``obj`` with its reST markup turned into Markdown."""
    lines = text.split("\n")
    lines = _grouped_args(_tables(_directives(lines)))
    return _ROLE.sub(_Roles(obj, package), "\n".join(lines))


class RstMarkup(griffe.Extension):
    """Rewrite the docstrings of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj, pkg)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
