"""The documentation is tested like code.

- Every ```python block in docs/*.md runs, in page order, in one namespace per page (like a notebook),
  in a temporary working directory. A block marked as a fragment (info string
  ``python title="fragment of examples/digits.py"``, or an HTML comment
  ``<!-- fragment: examples/digits.py -->`` on the line before it; any language) is instead checked
  line by line against the file it names.
- The LightningCLI flag command documented in getting-started.md runs (examples/cli.py).
- Every heading of troubleshooting.md quotes an error message the package really raises, and every
  message the package raises has a heading.
- The docstring examples (``>>>``) of the package pass, and the figure script runs.
- ``mkdocs build --strict`` succeeds (skipped when the docs tools are not installed).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import lightning_prospr

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "lightning_prospr"

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
FRAGMENT_TITLE = re.compile(r'title="fragment of (?P<path>[^"]+)"')
FRAGMENT_COMMENT = re.compile(r"<!--\s*fragment:\s*(?P<path>\S+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str
    fragment_of: str | None

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        info = match["info"].strip()
        language = info.split(maxsplit=1)[0] if info else ""
        indent = len(match["indent"])
        body = "\n".join(line[indent:] for line in match["body"].splitlines())
        before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
        fragment = FRAGMENT_TITLE.search(info) or FRAGMENT_COMMENT.search(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page.name, line, language, body, fragment["path"] if fragment else None))
    return found


PAGES = sorted(DOCS.glob("*.md"))
ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
PYTHON = [b for b in ALL_BLOCKS if b.language in ("python", "py")]
RUNNABLE_PAGES = sorted({b.page for b in PYTHON if b.fragment_of is None})
FRAGMENTS = [b for b in ALL_BLOCKS if b.fragment_of is not None]  # python, yaml, ...


def run_page(page: str, namespace: dict | None = None) -> dict:
    """Execute the runnable python blocks of ``page`` in order; returns the namespace."""
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    for block in PYTHON:
        if block.page != page or block.fragment_of is not None:
            continue
        start = time.perf_counter()
        # Blank lines in front keep the line numbers of tracebacks equal to the page's.
        code = compile("\n" * block.line + block.code, f"docs/{page}", "exec")
        exec(code, namespace)
        print(f"{block.where}: {time.perf_counter() - start:.2f} s")
    return namespace


def test_the_docs_have_code():
    assert PAGES and RUNNABLE_PAGES


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainer logs and checkpoints land here
    run_page(page)


@pytest.mark.parametrize("block", FRAGMENTS, ids=[b.where for b in FRAGMENTS])
def test_fragments_are_taken_from_their_files(block):
    source = ROOT / block.fragment_of
    assert source.is_file(), f"{block.where} names {block.fragment_of}, which does not exist"
    lines = {line.strip() for line in source.read_text(encoding="utf-8").splitlines()}
    missing = [line.strip() for line in block.code.splitlines() if line.strip() and line.strip() not in lines]
    assert not missing, f"{block.where}: lines not in {block.fragment_of}: {missing}"


def test_every_code_block_has_a_language():
    unlabelled = [b.where for b in ALL_BLOCKS if not b.language]
    assert not unlabelled, f"code blocks without a language (say python, bash or text): {unlabelled}"


# ------------------------------------------------------------------------------------ LightningCLI


def test_the_documented_cli_command_runs(tmp_path):
    """The flag form of getting-started.md, with a short fit appended, through examples/cli.py."""
    pytest.importorskip("jsonargparse")
    pytest.importorskip("sklearn")
    (command,) = [
        line
        for b in ALL_BLOCKS
        if b.page == "getting-started.md" and b.language == "bash"
        for line in b.code.splitlines()
        if "--trainer.callbacks+=" in line
    ]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "examples/cli.py", "fit"], command
    short = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / argv[1]), *argv[2:], *short],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Global sparsity: 98.00 %" in output


# ------------------------------------------------------------------------------- troubleshooting


def message_templates() -> dict[str, str]:
    """``{template: where}`` for every ``raise SomeError("message")`` in the package.

    f-string fields become ``…``; a message with fewer than three words of its own text (such as a
    re-raise that only adds context, ``f"{err} [{where}]"``) is left out.
    """
    templates = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            arg = node.exc.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                text = arg.value
            elif isinstance(arg, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "…" for v in arg.values)
            else:
                continue
            if len(re.findall(r"[A-Za-z]{2,}", text)) >= 3:
                templates[text] = f"{path.name}:{node.lineno}"
    return templates


def matches(heading: str, template: str) -> bool:
    """Whether ``heading`` is the start of a message that ``template`` produces (``…`` = any text)."""
    reach = {0}
    for char in heading:
        nxt = set()
        for j in reach:
            # Let each "…" of the template swallow any run of characters, including none.
            stack, seen = [j], set()
            while stack:
                k = stack.pop()
                if k in seen:
                    continue
                seen.add(k)
                if k < len(template) and template[k] == "…":
                    nxt.add(k)  # swallow this char
                    stack.append(k + 1)  # or skip the field
                elif k < len(template) and template[k] == char:
                    nxt.add(k + 1)
        reach = nxt
        if not reach:
            return False
    return True


def troubleshooting_headings() -> list[str]:
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    # "### `message`" or, when the message holds backticks itself, "### `` `message` ``".
    return [m[2] for m in re.finditer(r"^### (`+) ?(.+?) ?\1\s*$", text, flags=re.MULTILINE)]


def test_troubleshooting_headings_quote_real_messages():
    templates = message_templates()
    headings = troubleshooting_headings()
    assert len(headings) >= 10
    unknown = [h for h in headings if not any(matches(h, t) for t in templates)]
    assert not unknown, (
        f"troubleshooting.md headings that no `raise` in lightning_prospr/ produces: {unknown}"
    )


def test_every_error_message_is_in_troubleshooting():
    headings = troubleshooting_headings()
    missing = [
        f"{where}: {template}"
        for template, where in message_templates().items()
        if not any(matches(h, template) for h in headings)
    ]
    assert not missing, "error messages without a heading in docs/troubleshooting.md:\n" + "\n".join(missing)


def test_matching_rules():
    assert matches("`steps` must be an integer >= 0", "`steps` must be an integer >= 0 (0 is SNIP), got ….")
    assert matches("`sparsity` must be a float", "`…` must be a float in [0, 1), got ….")
    assert matches("… returned None on batch …", "… returned None on batch … of ProsPr scoring")
    assert not matches("`lr` must be positive", "`lr` must be a finite number > 0, got ….")


# ------------------------------------------------------------------------ docstrings and figure


def test_docstring_examples():
    failed = 0
    for info in pkgutil.iter_modules(lightning_prospr.__path__, "lightning_prospr."):
        module = importlib.import_module(info.name)
        failed += doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed
    assert failed == 0


def test_figure_script_runs(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "unroll.png"
    subprocess.run(
        [sys.executable, str(DOCS / "figures" / "make_unroll_figure.py"), str(out)], check=True, timeout=120
    )
    assert out.stat().st_size > 10_000
    assert (DOCS / "figures" / "unroll.png").is_file()


# ---------------------------------------------------------------------------------- the site


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx"):
        pytest.importorskip(module)
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()
