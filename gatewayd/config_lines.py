"""Line numbers for TOML keys, which `tomllib` does not report.

`index_lines` scans the text once and maps every table header and every ``key =`` line
to its 1-based line number, keyed by the same path the parsed document uses:
``("server", "workers")``, ``("listener", 0, "bind")``,
``("rule", 1, "path_rule", 0, "paths")``, ``("ssl_policy", "strict")``.
Arrays of tables get their element index, counted per parent element, exactly like
`tomllib` builds the lists.

The scanner only has to be right for text `tomllib` already accepted, so it tracks just
enough syntax (strings, comments, bracket depth) to tell a key at the start of a line
from text inside a multi-line array or string.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class LineIndex:
    """Path → line lookups with fallback to the nearest enclosing table or key."""

    def __init__(self, lines: dict[Path, int]) -> None:
        self._lines = lines

    def line(self, path: Path) -> int | None:
        """The line of `path`, or of its longest prefix that has one."""
        for end in range(len(path), 0, -1):
            found = self._lines.get(path[:end])
            if found is not None:
                return found
        return None


def _parse_dotted_key(text: str, pos: int) -> tuple[list[str], int] | None:
    """Read ``a."b c".'d'`` starting at `pos`; return its parts and the end position."""
    parts: list[str] = []
    while True:
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos >= len(text):
            return None
        char = text[pos]
        if char in "\"'":
            end = text.find(char, pos + 1)
            while char == '"' and end > 0 and text[end - 1] == "\\":
                end = text.find(char, end + 1)
            if end < 0:
                return None
            parts.append(text[pos + 1 : end])
            pos = end + 1
        else:
            match = _BARE_KEY.match(text, pos)
            if not match:
                return None
            parts.append(match.group())
            pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return parts, pos


class _Scanner:
    """One pass over the text; see the module docstring."""

    def __init__(self) -> None:
        self.lines: dict[Path, int] = {}
        self.arrays: dict[Path, int] = {}  # array-of-tables path → current last index
        self.table: Path = ()
        self.depth = 0  # open [ / { of values spanning lines
        self.string: str | None = None  # open multi-line string delimiter

    def resolve(self, parts: list[str]) -> Path:
        """Turn header parts into a document path, entering the last element of every
        array of tables on the way (``rule.path_rule`` → ``("rule", 3, "path_rule")``)."""
        path: Path = ()
        for part in parts:
            path = (*path, part)
            if path in self.arrays:
                path = (*path, self.arrays[path])
        return path

    def header(self, line: str, number: int) -> None:
        is_array = line.startswith("[[")
        parsed = _parse_dotted_key(line, 2 if is_array else 1)
        if parsed is None:
            return
        parts = parsed[0]
        if is_array:
            base = (*self.resolve(parts[:-1]), parts[-1])
            index = self.arrays.get(base, -1) + 1
            self.arrays[base] = index
            self.table = (*base, index)
            self.lines.setdefault(base, number)
        else:
            self.table = self.resolve(parts)
        self.lines[self.table] = number

    def key_line(self, line: str, number: int) -> int:
        """Record ``key = value``; return where the value starts."""
        parsed = _parse_dotted_key(line, 0)
        if parsed is None:
            return len(line)
        parts, pos = parsed
        if pos >= len(line) or line[pos] != "=":
            return len(line)
        path = self.table
        for part in parts:
            path = (*path, part)
            self.lines.setdefault(path, number)
        return pos + 1

    def value(self, line: str, pos: int) -> None:
        """Track strings, comments and brackets from `pos` to the end of the line."""
        while pos < len(line):
            if self.string is not None:
                end = line.find(self.string, pos)
                if end < 0:
                    return
                pos = end + 3
                self.string = None
                continue
            char = line[pos]
            if char == "#":
                return
            if line.startswith(('"""', "'''"), pos):
                self.string = line[pos : pos + 3]
                pos += 3
                continue
            if char in "\"'":
                pos = _skip_string(line, pos)
                continue
            if char in "[{":
                self.depth += 1
            elif char in "]}":
                self.depth = max(0, self.depth - 1)
            pos += 1

    def feed(self, raw: str, number: int) -> None:
        if self.string is None and self.depth == 0:
            line = raw.strip()
            if line.startswith("["):
                self.header(line, number)
                return
            if not line or line.startswith("#"):
                return
            self.value(line, self.key_line(line, number))
            return
        self.value(raw, 0)


def _skip_string(line: str, pos: int) -> int:
    """Position just after the one-line string starting at `pos`."""
    quote = line[pos]
    i = pos + 1
    while i < len(line):
        if quote == '"' and line[i] == "\\":
            i += 2
            continue
        if line[i] == quote:
            return i + 1
        i += 1
    return i


def index_lines(text: str) -> LineIndex:
    """Scan TOML `text` (already accepted by tomllib) into a `LineIndex`."""
    scanner = _Scanner()
    for number, raw in enumerate(text.splitlines(), start=1):
        scanner.feed(raw, number)
    return LineIndex(scanner.lines)
