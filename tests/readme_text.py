"""README.md as the tests read it: its prose (a sentence reads the same across line breaks), the groups of a
pattern found in it, and the cells of its tables' lines."""

import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"


def prose() -> str:
    """README.md with every run of whitespace one space."""
    return " ".join(README.read_text().split())


def find(pattern: str) -> tuple[str, ...]:
    """The groups of ``pattern``'s first match in README's prose; a missing sentence fails, naming the pattern."""
    match = re.search(pattern, prose())
    assert match, f"README.md no longer has {pattern!r}: update the test with README"
    return match.groups()


def table_cells(line: str) -> list[str]:
    """The stripped cells of a Markdown table line (``[""]`` for any other line)."""
    return [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else [""]
