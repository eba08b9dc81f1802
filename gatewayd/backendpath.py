"""Azure's "override backend path" (backend settings `path`), as a pure function.

- Basic rule: the override is prepended: `/home/` with `/override/` → `/override/home/`.
- Path rule `/pathrule/home/*`: the matched prefix `/pathrule/home/` is replaced:
  `/pathrule/home/secondhome/` → `/override/secondhome/`.
- Path rule `/pathrule/home*`: `/pathrule/homepage` → `/override/page`.
- Exact path rule `/x`: the whole path becomes the override.
"""

from __future__ import annotations


def matched_prefix(pattern: str, path: str) -> str | None:
    """The part of `path` a path-rule pattern matched (case-insensitive), or None."""
    lowered = path.lower()
    if pattern.endswith("*"):
        stem = pattern[:-1].lower()
        return path[: len(stem)] if lowered.startswith(stem) else None
    return path if lowered == pattern.lower() else None


def override_path(path: str, override: str, patterns: tuple[str, ...] = ()) -> str:
    """The path to send to the backend.  `patterns` are the matched path rule's (empty
    for a rule's default target)."""
    if not override:
        return path
    for pattern in patterns:
        prefix = matched_prefix(pattern, path)
        if prefix is not None:
            return override + path[len(prefix):].lstrip("/") if override.endswith("/") \
                else override + path[len(prefix):]
    return override.rstrip("/") + path
