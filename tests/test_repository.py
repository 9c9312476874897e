"""Repository hygiene over every tracked text file: no pointers to notes a user of slimrate does not have
(the team's private folder, numbered work items), and every cited docs/ page and section exists."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Spelled with character classes so that this file does not match its own patterns.
TEAM_REFERENCE = re.compile(r"paper[s]/|\.\./share[d]|\biss[u]e\s+\d+", re.IGNORECASE)
# A docs page cited by path, with any section numbers right after it: "docs/dmb.md §2–§4", "docs/uba.md §1, §3".
DOCS_CITATION = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)((?:[\s,–-]*§\d+)*)")
SECTION_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)


@pytest.fixture(scope="module")
def tracked_text() -> dict[str, str]:
    """Relative path → text of every tracked file that is UTF-8 text (binary files, e.g. PNGs, left out)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout (or no git): cannot list tracked files ({e})")
    texts = {}
    for name in listing.decode().split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    assert texts, "git ls-files listed no text files"
    return texts


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def test_no_tracked_file_points_to_team_notes(tracked_text):
    hits = [f"{name}:{line_of(text, m.start())}: {m.group(0)!r}"
            for name, text in sorted(tracked_text.items()) for m in TEAM_REFERENCE.finditer(text)]
    assert not hits, ("these lines point readers to notes they do not have; cite docs/<page>.md §N or the "
                      "paper (arXiv id) instead:\n" + "\n".join(hits))


def test_cited_docs_pages_exist(tracked_text):
    missing = [f"{name}:{line_of(text, m.start())}: docs/{m.group(1)}"
               for name, text in sorted(tracked_text.items()) for m in DOCS_CITATION.finditer(text)
               if not (REPO / "docs" / m.group(1)).is_file()]
    assert not missing, "cited docs pages that do not exist:\n" + "\n".join(missing)


def test_cited_docs_sections_exist(tracked_text):
    sections = {page: set(SECTION_HEADING.findall(text)) for page, text in tracked_text.items()
                if page.startswith("docs/")}
    missing = []
    for name, text in sorted(tracked_text.items()):
        for m in DOCS_CITATION.finditer(text):
            page = f"docs/{m.group(1)}"
            for number in re.findall(r"§(\d+)", m.group(2)):
                if page in sections and number not in sections[page]:
                    missing.append(f"{name}:{line_of(text, m.start())}: {page} §{number}")
    assert not missing, "cited sections that the page does not have (its headings are '## N. Title'):\n" + \
        "\n".join(missing)
