"""The documentation: README.md and docs/*.md.

Links: every relative link or image in README.md and docs/*.md (``[text](target)``, ``![alt](target)``,
outside code blocks and code spans) names a file or folder that exists, relative to the page; a
``#anchor`` on a Markdown page (or on the page itself) names one of its headings, slugged as GitHub
does (lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` ... for
repeats). Links with a scheme (``https:``, ``mailto:``) are not checked.

Runnable blocks: a fenced ``python`` block in docs/*.md is run by this test when the line right
before its opening fence is exactly ``<!-- runnable -->`` (an HTML comment, invisible on GitHub).
Each such block must be self-contained (its own imports), build tiny random models from configs
(``AutoConfig.for_model(...)``), download nothing, and assert or print what it shows. The test runs
each block in a fresh namespace, in an empty working folder, with the network closed (any socket
connection raises). Blocks without the marker (a real Hub model, a multi-GPU launch) are
illustration and are not run.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKER = "<!-- runnable -->"

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; with ``blank_code``, inline code spans blanked."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", "``", line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before repeats are numbered)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code=False):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def broken_links(page: Path) -> list[str]:
    """'page:line: target (why)' for every relative link of ``page`` that does not resolve."""
    problems = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if SCHEME.match(target) or target.startswith("//"):
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.name}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where} (no heading with that anchor in {resolved.name})")
            elif anchor and resolved.suffix != ".md":
                problems.append(f"{where} (an anchor into a file that is not Markdown)")
    return problems


def runnable_blocks() -> list[tuple[str, str]]:
    """(id 'page.md:line', code) of every block marked runnable in docs/."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            if line.strip() != MARKER:
                continue
            opening = lines[index + 1] if index + 1 < len(lines) else ""
            assert opening.strip() == "```python", (
                f"{page.name}:{index + 1}: {MARKER} must be followed by a ```python line, got {opening!r}")
            end = next(j for j in range(index + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append((f"{page.name}:{index + 2}", "\n".join(lines[index + 2 : end]) + "\n"))
    return blocks


BLOCKS = runnable_blocks()


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_fails_on_broken_links(tmp_path):
    """The checker itself: a missing file, a missing anchor, and a link in a code block (ignored)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Save, load, push\n\n## Measured\n\n## Measured\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n[ok](docs/a.md) [ok](docs/a.md#save-load-push) [ok](docs/a.md#measured-1) [ok](#title)\n"
        "[gone](docs/b.md) and [bad anchor](docs/a.md#nowhere) ![img](docs/missing.png) [web](https://x.org/y)\n"
        "`[span](docs/span.md)`\n\n```python\n[code](docs/code.md)\n```\n"
    )
    problems = broken_links(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/b.md (no such file)",
        "docs/a.md#nowhere (no heading with that anchor in a.md)",
        "docs/missing.png (no such file)",
    ]


def test_slugs_follow_github():
    assert slug("Real tier: SmolLM2-135M-Instruct on English text") == "real-tier-smollm2-135m-instruct-on-english-text"
    assert slug("Fine-tuning recipes (`recipes/`)") == "fine-tuning-recipes-recipes"
    assert slug("Save, load, push") == "save-load-push"
    assert slug("Streaming: attention-sink KV cache") == "streaming-attention-sink-kv-cache"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {(REPO / target.partition("#")[0]).resolve() for _, line in prose_lines(readme)
              for target in LINK.findall(line) if not SCHEME.match(target)}
    assert [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked] == []


def test_most_docs_pages_have_runnable_blocks():
    with_blocks = {block_id.split(":")[0] for block_id, _ in BLOCKS}
    all_pages = {p.name for p in DOCS.glob("*.md")}
    assert len(with_blocks) >= len(all_pages) * 2 // 3, sorted(all_pages - with_blocks)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: every socket connection raises; the Hub client is told it is offline too."""
    def refuse(*args, **kwargs):
        raise OSError("a docs example tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_runnable_block_runs_offline_on_a_tiny_model(code, offline, request):
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "__docs__"})
