"""Validators for values that arrive from outside (bucket objects, CI variables, status fields).

Every pattern is written without anchors and used only through `valid()`, which applies
`re.fullmatch`: a trailing newline (`"main\\n"`) or any other extra character fails. Never
use these patterns with `match` or `search`.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# <UTC time>Z-<short commit>-<random>: sorts by upload time.
SUBMISSION_ID = re.compile(r"[0-9]{8}T[0-9]{12}Z-[0-9a-f]{7,40}-[0-9a-f]{6}")
COMMIT = re.compile(r"[0-9a-f]{40}")
# A plain branch name: no refspec syntax (':', '+', '^', '~', '*', '?', '[', '\\', space),
# '@', no '..', '//', no component starting with '.', no '.lock' component end, no leading '-'.
SAFE_BRANCH = re.compile(r"(?!-)(?!\.)(?!.*\.\.)(?!.*//)(?!.*/\.)(?!.*\.lock(?:/|\Z))[A-Za-z0-9._/-]{1,200}(?<![./])")
SAFE_REMOTE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFE_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,200}")
SAFE_CONFIG_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,200}\.ya?ml")
# A GitLab project path: group[/subgroup...]/project.
PROJECT_PATH = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,254}(?:/[A-Za-z0-9_.][A-Za-z0-9_.-]{0,254}){1,20}")
# A relative path inside a checkout (results/<experiment>): plain parts, no '..'.
RELATIVE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}(?:/[A-Za-z0-9_][A-Za-z0-9._-]{0,63}){0,15}")
WATCHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")


def valid(pattern: re.Pattern, value: object) -> bool:
    """`value` is a string that the whole of `pattern` matches."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def relative_inside(value: object) -> bool:
    """A relative path without '..' or '.' parts (it stays inside the folder it is joined to)."""
    if not valid(RELATIVE_PATH, value):
        return False
    return all(part not in (".", "..") for part in PurePosixPath(value).parts)


def config_path(value: object) -> bool:
    return valid(SAFE_CONFIG_PATH, value) and ".." not in value.split("/")


def short(value: object, n: int = 60) -> str:
    """A value for an error message: repr, cut to n characters."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
