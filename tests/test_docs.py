"""The README and docs/ stand on their own: a short README, and every link resolves to a file
inside the repository."""

import re
from urllib.parse import unquote

import pytest

from helpers import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
README_MAX_LINES = 150

FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
# Links that name another site, not a file (scheme://..., mailto:).
WEB_LINK = re.compile(r"^(https?://|mailto:)", re.IGNORECASE)


def link_targets(markdown: str) -> list[str]:
    """The targets of a Markdown text's links and images, code blocks and code spans left out."""
    prose = INLINE_CODE.sub("", FENCED_BLOCK.sub("", markdown))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def relative_paths_in_code(markdown: str) -> list[str]:
    """Code spans that name a file by a path relative to the page (``../...``): a reader follows
    them like links."""
    spans = (span.strip("`") for span in INLINE_CODE.findall(FENCED_BLOCK.sub("", markdown)))
    return [span for span in spans if span.startswith("../")]


def test_link_targets_finds_every_kind_of_link():
    text = (
        'See [the math](docs/semantics.md#charge) and ![plot](../benchmarks/a.png "title").\n'
        "[ref]: /etc/passwd\n"
        "`[not](a-link.md)`\n"
        "```\n[nor](this.md)\n```\n"
    )
    assert link_targets(text) == ["docs/semantics.md#charge", "../benchmarks/a.png", "/etc/passwd"]
    assert relative_paths_in_code("the spec is `../spec/plif.md`; `a/b.md` is not relative to the page") == [
        "../spec/plif.md"
    ]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_links_stay_in_the_repository_and_resolve(page):
    problems = []
    text = page.read_text(encoding="utf-8")
    for target in link_targets(text) + relative_paths_in_code(text):
        if WEB_LINK.match(target):
            continue
        path_part = unquote(target.split("#", 1)[0])
        if not path_part:
            continue  # a link to a heading of the same page
        if path_part.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path_part):
            problems.append(f"{target}: an absolute path or another scheme, not a file of the repository")
            continue
        resolved = (page.parent / path_part).resolve()
        if not resolved.is_relative_to(REPO_ROOT):
            problems.append(f"{target}: leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
    assert not problems, f"{page.relative_to(REPO_ROOT)}: " + "; ".join(problems)


def test_readme_links_every_page_of_docs():
    linked = {
        (REPO_ROOT / unquote(target.split("#", 1)[0])).resolve()
        for target in link_targets(README.read_text(encoding="utf-8"))
        if not WEB_LINK.match(target)
    }
    unlinked = [str(page.relative_to(REPO_ROOT)) for page in DOCS if page.resolve() not in linked]
    assert DOCS, "docs/ holds no pages"
    assert not unlinked, f"README.md does not link {unlinked}"
