"""The documentation that ships in the repository: links, citations and README code.

(a) Every relative link and image in README.md, models/README.md and docs/**/*.md points at a
    file or folder inside the repository (never above its root, never into ``shared/``), and a
    ``#anchor`` into a Markdown file names a heading of that file (GitHub's slug rules).
    External http(s) links are refused unless listed in ``EXTERNAL_LINKS_ALLOWED`` (none
    today): the docs read offline.
(b) No project file cites the team's internal specification, which users never see; formulas
    are cited from docs/maths.md instead.
(c) Every ```python block of a README runs as written, in order, in one fresh Python process
    per README (cwd = repository root, 120 s). A block that is not meant to run is fenced as
    ``text`` or ``console``.
(d) Citations of docs/maths.md in the project's files (``docs/maths.md, 'The percentile
    threshold'`` in docstrings, ``docs/maths.md#the-percentile-threshold`` as a link) name
    headings that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
MATHS = REPO / "docs" / "maths.md"
READMES = ("README.md", "models/README.md")
PROJECT_PARTS = ("README.md", "docs", "rectonnx", "converters", "models", "benchmarks", "tests")
BINARY_SUFFIXES = {".onnx", ".png", ".jpg", ".jpeg", ".gif", ".npz", ".npy", ".pt", ".pkl"}
EXTERNAL_LINKS_ALLOWED: frozenset[str] = frozenset()
README_TIMEOUT_S = 120
# the internal specification's name, spelt so that this file does not cite it itself
INTERNAL_SPEC = re.compile(r"\b" + "SP" + r"EC\b")


# -- Markdown parsing ----------------------------------------------------------------------------
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def fenced(text: str) -> list[tuple[int, int, str, str]]:
    """``(opening index, closing index, info word, body)`` of every fenced code block (0-based
    line indices; an unclosed block runs to the end)."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].lower()
        closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        blocks.append((i, j, info, "\n".join(lines[i + 1:j])))
        i = j + 1
    return blocks


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line number of the first body line, info word, body)`` of every fenced block
    (1-based line numbers)."""
    return [(opening + 2, info, body) for opening, _, info, body in fenced(text)]


def prose(text: str, *, inline_code: bool = False) -> str:
    """``text`` with fenced code blocks blanked (line numbers kept) and, unless ``inline_code``,
    every inline code span replaced by the word ``code``."""
    lines = text.splitlines()
    for opening, closing, _, _ in fenced(text):
        for k in range(opening, min(closing, len(lines) - 1) + 1):
            lines[k] = ""
    joined = "\n".join(lines)
    return joined if inline_code else re.sub(r"(`+)(?:(?!\1).)+?\1", "code", joined, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                        # inline HTML tags
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The text of every heading of a Markdown file (ATX and setext), outside code blocks."""
    lines = prose(path.read_text(encoding="utf-8"), inline_code=True).splitlines()
    found = []
    for i, line in enumerate(lines):
        atx = re.match(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", line)
        if atx:
            found.append(atx[1])
        elif i and re.match(r"^ {0,3}(=+|-+)[ \t]*$", line) and lines[i - 1].strip() and \
                not re.match(r"^ {0,3}([-*+>|#]|\d+[.)])", lines[i - 1]):
            found.append(lines[i - 1].strip())
    return found


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the file: heading slugs (repeats numbered -1, -2, ...) and
    explicit ``id``/``name`` attributes of HTML tags."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        result.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    text = path.read_text(encoding="utf-8")
    result |= set(re.findall(r"<[a-zA-Z][^>]*\b(?:id|name)=[\"']([^\"']+)[\"']", text))
    return result


INLINE_LINK = re.compile(r"(!?)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img|source)\b[^>]*\b(?:href|src)=[\"']([^\"']+)[\"']", re.I)
BARE_URL = re.compile(r"(?:https?|ftp)://[^\s)>\]\"']+", re.I)


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link, image, reference definition, HTML link and bare URL
    outside code."""
    text = prose(path.read_text(encoding="utf-8"))
    found = []
    for pattern in (INLINE_LINK, REFERENCE_DEFINITION, HTML_LINK):
        for match in pattern.finditer(text):
            found.append((text.count("\n", 0, match.start()) + 1, match.groups()[-1]))
    linked = {target for _, target in found}
    for match in BARE_URL.finditer(text):
        if match.group(0) not in linked:
            found.append((text.count("\n", 0, match.start()) + 1, match.group(0)))
    return sorted(found)


def markdown_files() -> list[Path]:
    files = [REPO / name for name in READMES if (REPO / name).is_file()]
    return files + sorted((REPO / "docs").rglob("*.md"))


def link_problems(path: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with the links of the Markdown file ``path`` in the repository ``repo``."""
    problems = []
    where = path.relative_to(repo)
    for line, target in links(path):
        here = f"{where}:{line}: {target!r}"
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # a scheme: http, https, mailto, ...
            if target not in EXTERNAL_LINKS_ALLOWED:
                problems.append(f"{here}: external link (the docs must read offline; link a file "
                                f"in the repository, or add it to EXTERNAL_LINKS_ALLOWED)")
            continue
        if not target:
            problems.append(f"{here}: empty link")
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        resolved = path
        if file_part:
            base = repo if file_part.startswith("/") else path.parent
            resolved = (base / file_part.lstrip("/")).resolve()
            try:
                inside = resolved.relative_to(repo.resolve())
            except ValueError:
                problems.append(f"{here}: points outside the repository")
                continue
            if inside.parts[:1] == ("shared",):
                problems.append(f"{here}: points into shared/, which users never see")
                continue
            if not resolved.exists():
                problems.append(f"{here}: no such file {inside}")
                continue
        if anchor and resolved.suffix.lower() == ".md" and resolved.is_file():
            if unquote(anchor).lower() not in anchors(resolved):
                problems.append(f"{here}: no heading with anchor #{anchor} in "
                                f"{resolved.relative_to(repo.resolve())}")
    return problems


# -- (a) links -----------------------------------------------------------------------------------
def test_the_docs_to_check_exist():
    names = {str(p.relative_to(REPO)) for p in markdown_files()}
    assert {"README.md", "models/README.md", "docs/maths.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_resolve_inside_the_repository(path):
    problems = link_problems(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_github_anchor_slugs():
    assert slug("The percentile threshold") == "the-percentile-threshold"
    assert slug("The paper's claims the graph reproduces") == \
        "the-papers-claims-the-graph-reproduces"
    assert slug("A `code` heading, with punctuation!") == "a-code-heading-with-punctuation"
    assert slug("padding_trick and q = 98") == "padding_trick-and-q--98"
    assert slug("Epsilon-LRP") == "epsilon-lrp"


def test_link_checker_reports_each_kind_of_bad_link(tmp_path):
    """The checker itself, on a made-up repository: bad links are reported, good ones are not."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "shared").mkdir()
    (repo / "shared" / "notes.md").write_text("# Notes\n")
    (repo / "docs" / "maths.md").write_text("# Maths\n\n## The percentile threshold\n\n"
                                           "## Twice\n\n## Twice\n")
    (repo / "README.md").write_text("\n".join([
        "# Title", "", "## A `code` heading, with punctuation!", "",
        "[good](docs/maths.md#the-percentile-threshold) [good](#title)",
        "[good](#a-code-heading-with-punctuation) [good](docs/maths.md#twice-1)",
        "![good](docs/maths.md) [`good`](docs/)",
        "[outside](../outside.md) [shared](shared/notes.md) [missing](docs/missing.md)",
        "[anchor](docs/maths.md#no-such-heading) [web](https://example.com) [here](#nowhere)",
        "see http://example.org/page too",
        "```text", "[in a code block](nowhere.md)", "```", "`[in code](nowhere.md)`",
    ]))
    problems = link_problems(repo / "README.md", repo)
    expected = ["outside the repository", "points into shared/", "no such file docs/missing.md",
                "no heading with anchor #no-such-heading", "external link",
                "no heading with anchor #nowhere", "external link"]
    assert len(problems) == len(expected), "\n".join(problems)
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert not any("nowhere.md" in p or "good" in p for p in problems), problems


# -- (b) no citation of the internal specification -----------------------------------------------
def project_files() -> list[Path]:
    """The project's files (tracked, or new and not ignored) under PROJECT_PARTS."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--",
             *PROJECT_PARTS], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
        names = sorted({n for n in listed.decode().split("\0") if n})
        files = [REPO / n for n in names]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: walk the folders
        files = []
        for part in PROJECT_PARTS:
            root = REPO / part
            if root.is_file():
                files.append(root)
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames
                               if d not in ("__pycache__", ".venv") and not d.endswith(".egg-info")]
                files += [Path(dirpath) / f for f in filenames]
    return [f for f in files if f.is_file() and f.suffix.lower() not in BINARY_SUFFIXES]


def test_no_project_file_cites_the_internal_spec():
    """Users never see the team's internal specification: the project cites docs/maths.md."""
    hits = []
    for path in project_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if INTERNAL_SPEC.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not hits, ("cite docs/maths.md (e.g. \"docs/maths.md, 'The percentile threshold'\") "
                      "instead of the internal specification:\n" + "\n".join(hits))


# -- (c) README code runs ------------------------------------------------------------------------
def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(first, body) for first, info, body in code_blocks(path.read_text(encoding="utf-8"))
            if info in ("python", "py", "python3")]


def block_source(blocks: list[tuple[int, str]]) -> str:
    """The blocks concatenated, each at its own line numbers of the README (blank lines between),
    so a traceback's line number is the README's."""
    import textwrap

    lines: list[str] = []
    for first, body in blocks:
        lines += [""] * (first - 1 - len(lines))
        lines += textwrap.dedent(body).splitlines()
    return "\n".join(lines) + "\n"


RUNNER = ("import sys\n"
          "source = open(sys.argv[1], encoding='utf-8').read()\n"
          "exec(compile(source, sys.argv[2], 'exec'), {'__name__': '__main__'})\n")


def test_the_readme_has_python_to_run():
    assert python_blocks(REPO / "README.md"), "README.md has no ```python block to test"


def readme_failure(path: Path, repo: Path, scratch: Path) -> str | None:
    """Run the python blocks of the README ``path`` as one script in a fresh process (cwd
    ``repo``); None when it exits 0, else a message showing the failing block and stderr."""
    blocks = python_blocks(path)
    if not blocks:
        return None
    name = path.relative_to(repo).as_posix()
    script = scratch / "readme_blocks.py"
    script.write_text(block_source(blocks), encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        run = subprocess.run([sys.executable, "-c", RUNNER, str(script), name], cwd=repo,
                             env=env, capture_output=True, text=True, timeout=README_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (f"{name}: the python blocks ran past {README_TIMEOUT_S} s:\n" +
                "\n\n".join(f"--- block at line {first}:\n{body}" for first, body in blocks))
    if run.returncode == 0:
        return None
    lines = [int(n) for n in re.findall(rf'File "{re.escape(name)}", line (\d+)', run.stderr)]
    shown = [(first, body) for first, body in blocks
             if lines and first <= lines[-1] <= first + body.count("\n")] or blocks
    return (f"{name}: a python block failed (exit {run.returncode}); fence blocks that are not "
            f"meant to run as text or console.\n" +
            "\n\n".join(f"--- block at line {first}:\n{body}" for first, body in shown) +
            f"\n--- stderr:\n{run.stderr[-4000:]}")


@pytest.mark.parametrize("readme", [r for r in READMES if (REPO / r).is_file()])
def test_readme_python_blocks_run(readme, tmp_path):
    """Every ```python block of the README, verbatim and in order, in one fresh process."""
    failure = readme_failure(REPO / readme, REPO, tmp_path)
    if failure:
        pytest.fail(failure, pytrace=False)


def test_readme_runner_shows_the_failing_block(tmp_path):
    """The runner itself: blocks share one namespace in order; a failure names its block."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("3")
    readme = repo / "README.md"
    readme.write_text("\n".join([
        "# Demo", "", "```python", "n = int(open('data.txt').read())  # cwd is the repository",
        "```", "", "```console", "$ not python", "```", "", "```python", "assert n == 3",
        "m = n + 1", "```", "", "  ```python", "  assert m == 4, 'indented blocks are dedented'",
        "  ```", ""]))
    assert readme_failure(readme, repo, tmp_path) is None
    readme.write_text(readme.read_text() + "```python\nraise ValueError('broken block')\n```\n")
    failure = readme_failure(readme, repo, tmp_path)
    assert failure is not None and "--- block at line 20:\nraise ValueError('broken block')" \
        in failure and "ValueError: broken block" in failure, failure
    assert "assert n == 3" not in failure  # only the failing block is shown


# -- (d) citations of docs/maths.md name real headings -------------------------------------------
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".json", ".yaml", ".yml", ""}
CITATION = re.compile(r"docs/maths\.md,\s+(?:'([^']+)'|\"([^\"]+)\")")
ANCHOR_CITATION = re.compile(r"docs/maths\.md#([A-Za-z0-9_-]+)")


def test_citations_of_maths_md_name_its_headings():
    titles = {re.sub(r"\s+", " ", h.replace("`", "")).strip().lower() for h in headings(MATHS)}
    slugs = anchors(MATHS)
    problems = []
    for path in project_files():
        if path.suffix.lower() not in TEXT_SUFFIXES or path in (MATHS, Path(__file__).resolve()):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        flat = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)  # citations wrapped over lines or comments
        for match in CITATION.finditer(flat):
            title = re.sub(r"\s+", " ", match[1] or match[2]).strip()
            if title.lower() not in titles:
                problems.append(f"{path.relative_to(REPO)}: no section {title!r} in docs/maths.md")
        for match in ANCHOR_CITATION.finditer(text):
            if match[1].lower() not in slugs:
                problems.append(f"{path.relative_to(REPO)}: no anchor #{match[1]} in docs/maths.md")
    assert not problems, ("sections of docs/maths.md: " + "; ".join(headings(MATHS)) + "\n" +
                          "\n".join(problems))
