"""Every math reference in the code names a heading of docs/math.md (the convention is stated at the top of that
page: ``math.md §"Heading"``); section numbers and ``(b2)``-style labels of the design note are refused."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r'§"([^"]+)"')
OLD_STYLE = re.compile(r'§(?!")|\(b\d+\)')  # § not followed by a quoted heading; (b2), (b5)


def headings(text: str) -> list:
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def check(files, page: str) -> list:
    """(file:line, problem) for every reference in ``files`` that is malformed or names no heading of ``page``."""
    heads = headings(page)
    problems = []
    for path in files:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            for m in OLD_STYLE.finditer(line):
                problems.append((f"{path}:{n}", f"not a heading reference: {line[max(0, m.start() - 20):m.end() + 20]!r}"))
            for name in REFERENCE.findall(line):
                if not any(h == name or h.startswith(name + " (") for h in heads):
                    problems.append((f"{path}:{n}", f"no heading {name!r} on docs/math.md"))
    return problems


def code_files():
    me = Path(__file__).resolve()
    for folder in ("src", "training", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md") and path.resolve() != me:
                yield path


def test_every_math_reference_names_a_heading():
    page = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    files = list(code_files())
    found = sum(len(REFERENCE.findall(p.read_text(encoding="utf-8"))) for p in files)
    assert found >= 10, found  # the scan sees the code's references (a glob that finds nothing would pass)
    assert check(files, page) == []


def test_the_check_catches_bad_references(tmp_path):
    page = "# The math\n## The exact step (`solver_order=1`)\n### The stratified t draw\n"
    good = tmp_path / "good.py"
    good.write_text('"""(math.md §"The exact step") and math.md §"The stratified t draw"."""\n')
    assert check([good], page) == []
    bad = tmp_path / "bad.py"
    bad.write_text('"""math.md §4.3, the step (b2), math.md §"The exact", math.md §"No such heading"."""\n')
    problems = [p for _, p in check([bad], page)]
    assert len(problems) == 4, problems
