"""The repository cites only documents it holds.

Every file git tracks (or would track) is scanned for references to documents: a path such
as ``docs/reference.md`` or ``BENCHMARKS.md`` must exist, a section such as
``docs/reference.md §4.3`` must be a numbered heading of that file, and a Markdown link
between documents must lead to an existing file and heading. Developer notes kept outside
the repository, issue-tracker threads and notes of a working session are not documents a
reader can follow, so naming them is an error too. The patterns below are written so that
this file does not match them itself.
"""

import functools
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Documents outside the repository (each pattern's source text does not match itself).
OUTSIDE = {
    "a developer spec": re.compile(r"\bS[P]EC\b"),
    "a developer design note": re.compile(r"\bD[E]SIGN\.md\b"),
    "a folder outside the repository": re.compile(r"\.\./s[h]ared\b|/work/s[h]ared\b"),
    "notes of a working session": re.compile(r"\bs[e]ssion notes\b", re.IGNORECASE),
    "an issue-tracker thread": re.compile(r"\bi[s]sue #?\d+", re.IGNORECASE),
}
# A path to a Markdown document, under docs/ or at the root.
DOC_PATH = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)\b")
# A section citation: the path, then one or more section numbers (§4, §4.3, §2-§5, §2, §4).
SECTION = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)((?:[\s,-]*§\d+(?:\.\d+)*)+)")
SECTION_NUMBER = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
NUMBERED_HEADING = re.compile(r"^#{1,6} +(\d+(?:\.\d+)*)[. ]", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]*)\)")
TEXT_SUFFIXES = (".py", ".md", ".ipynb", ".toml", ".txt", ".cfg", ".yaml", ".yml", ".sh", ".json")


@functools.cache
def repository_files() -> tuple[Path, ...]:
    """Tracked files plus new ones git does not ignore (so a file is checked before it is
    committed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    files = [ROOT / name for name in listed if name]
    return tuple(sorted({f for f in files if f.is_file()}))


def text_files() -> list[Path]:
    files = [f for f in repository_files()
             if f.suffix in TEXT_SUFFIXES or f.parent.name == ".ci"]
    assert files, "no files found: is this a git checkout?"
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def resolve(reference: str, citing: Path) -> Path | None:
    """The document a path names: relative to the citing file, the root or docs/."""
    for base in (citing.parent, ROOT, ROOT / "docs"):
        candidate = (base / reference).resolve()
        if candidate.is_file() and ROOT in candidate.parents:
            return candidate
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    return frozenset(slug(h) for h in HEADING.findall(read(path)))


@functools.cache
def section_numbers(path: Path) -> frozenset[str]:
    return frozenset(NUMBERED_HEADING.findall(read(path)))


def where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def test_nothing_cites_a_document_outside_the_repository():
    found = []
    for path in text_files():
        text = read(path)
        for what, pattern in OUTSIDE.items():
            for match in pattern.finditer(text):
                line = text[text.rfind("\n", 0, match.start()) + 1:text.find("\n", match.end())]
                if what == "an issue-tracker thread" and "://" in line:
                    continue  # an upstream project's issue, with its address
                found.append(f"{where(path, text, match.start())}: {match.group(0)!r} "
                             f"({what})")
    assert not found, "references to documents the repository does not hold:\n" + \
        "\n".join(found)


def test_cited_documents_and_sections_exist():
    missing = []
    for path in text_files():
        text = read(path)
        for match in DOC_PATH.finditer(text):
            if resolve(match.group(1), path) is None:
                missing.append(f"{where(path, text, match.start())}: {match.group(1)} "
                               f"does not exist")
        for match in SECTION.finditer(text):
            document = resolve(match.group(1), path)
            if document is None:
                continue  # reported above
            for number in SECTION_NUMBER.findall(match.group(2)):
                if number not in section_numbers(document):
                    missing.append(f"{where(path, text, match.start())}: {match.group(1)} "
                                   f"has no section {number}")
    assert not missing, "\n".join(missing)


def test_markdown_links_lead_to_files_and_headings():
    broken = []
    for path in text_files():
        if path.suffix != ".md":
            continue
        text = read(path)
        for match in LINK.finditer(text):
            target = match.group(1)
            if not target or "://" in target or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            document = resolve(file_part, path) if file_part else path
            if document is None:
                broken.append(f"{where(path, text, match.start())}: {target} (no such file)")
            elif anchor and document.suffix == ".md" and anchor not in anchors(document):
                broken.append(f"{where(path, text, match.start())}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_section_check_can_fail():
    """The citation patterns find what they guard: a section number the document lacks is
    reported, one it has is not."""
    document = "docs/reference" + ".md"
    match = SECTION.search(f"see {document} §99, §4.3,\n§2-§5 for more")
    assert match.group(1) == document
    assert SECTION_NUMBER.findall(match.group(2)) == ["99", "4.3", "2", "5"]
    numbers = section_numbers(ROOT / "docs" / "reference.md")
    assert "99" not in numbers and {"4.3", "2", "5"} <= numbers


def test_the_outside_patterns_match_what_they_guard_against():
    samples = {
        "a developer spec": "as " + "SP" + "EC §2 says",
        "a developer design note": "see " + "DES" + "IGN" + ".md",
        "a folder outside the repository": "../" + "shared/notes.md",
        "notes of a working session": "(" + "session" + " notes)",
        "an issue-tracker thread": "(" + "issue" + " #6 has the measurements)",
    }
    for what, sample in samples.items():
        assert OUTSIDE[what].search(sample), what
    assert not OUTSIDE["a developer spec"].search("ASPECT_MODES, spec_table")
