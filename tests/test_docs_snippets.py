"""Every ```python block of README.md and docs/*.md runs as written, or says that it cannot.

A block whose first line is a comment starting `# fragment:` (followed by what it needs: weights,
a server, the variables of the text around it) is collected and skipped, with "fragment" in its
test id; every other block is run, in a fresh namespace, from a temporary working directory,
against the tiny random-weight pipelines of flowsteer.testing and the built-in rewards. Blocks
indented inside a list item count too. Other languages (bash, yaml, plain ```) are not extracted.
"""
import linecache
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "# fragment:"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:60]


def python_blocks(path: pathlib.Path):
    """(line of the opening fence, nearest heading above it, dedented code) of each ```python block."""
    text = path.read_text(encoding="utf-8")
    fences = list(_FENCE.finditer(text))
    prose = text  # headings are looked for outside code blocks (a '# comment' in one is not a heading)
    for m in fences:
        prose = prose[:m.start()] + re.sub(r"[^\n]", " ", m.group(0)) + prose[m.end():]
    headings = [(m.start(), m.group(1)) for m in _HEADING.finditer(prose)]
    out = []
    for m in fences:
        if m.group("lang").strip() != "python":
            continue
        line = text.count("\n", 0, m.start()) + 1
        above = [h for pos, h in headings if pos < m.start()]
        out.append((line, above[-1] if above else "", textwrap.dedent(m.group("body"))))
    return out


def _params():
    params = []
    for path in DOCS:
        for line, heading, code in python_blocks(path):
            name = f"{path.relative_to(ROOT)}:{line}:{_slug(heading)}"
            first = code.lstrip().splitlines()[0] if code.strip() else ""
            if first.startswith(FRAGMENT):
                reason = f"{name} is a fragment ({first[len(FRAGMENT):].strip()})"
                params.append(pytest.param(path, line, code, id=f"{name}:fragment",
                                           marks=pytest.mark.skip(reason=reason)))
            else:
                params.append(pytest.param(path, line, code, id=name))
    return params


PARAMS = _params()


@pytest.mark.parametrize("path,line,code", PARAMS)
def test_snippet_runs(path, line, code, tmp_path, monkeypatch):
    filename = f"<{path.relative_to(ROOT)} block at line {line}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # tracebacks show the snippet
    monkeypatch.chdir(tmp_path)  # snippets that write (runs/...) write here
    exec(compile(code, filename, "exec"), {"__name__": "__docs_snippet__"})


def test_the_extraction_finds_the_blocks_it_should(tmp_path):
    """The fence pattern finds top-level and list-indented python blocks and leaves the others."""
    path = tmp_path / "probe.md"
    path.write_text("# Title\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n## Two\n\n- item\n\n  ```python\n"
                    "  # fragment: needs y\n  y + 1\n  ```\n\n```\nplain\n```\n", encoding="utf-8")
    assert python_blocks(path) == [(3, "Title", "x = 1\n"), (15, "Two", "# fragment: needs y\ny + 1\n")]


def test_readme_sections_have_runnable_snippets():
    """The README's three library sections each hold a block that runs (not a fragment)."""
    runnable = {p.id for p in PARAMS if not p.marks}
    for section in ("the-sde-step-inside-your-own-sampling-loop", "rollouts-inside-your-own-trainer", "rewards"):
        assert any(i.startswith("README.md:") and i.endswith(":" + section) for i in runnable), (section, runnable)
