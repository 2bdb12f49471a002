"""Error messages leave the worker without the server's paths.

Used by the worker (engine/worker.py) on every Failure message it replies. DuckDB names files
in its errors as they were written, and the catalog writes them absolute; the client sees them
relative to data_dir. (The worker does not work in data_dir: DuckDB would then take a relative
name such as 'http://...' for a file inside the sandbox.) The runtime directory (it holds the supervisor's PID) and the home directory are replaced by
placeholders. An internal error keeps only its first line: the rest is DuckDB's stack trace.
"""

from __future__ import annotations

import os
import re

RUNTIME = "<runtime>"
HOME = "~"


class Redactor:
    def __init__(self, data_dir: str, runtime_dir: str, home: str | None = None):
        home = home if home is not None else os.path.expanduser("~")
        self._by_path: dict[str, str] = {}
        for path, replacement in ((runtime_dir, RUNTIME), (home, HOME), (data_dir, ".")):
            if path and path.rstrip("/"):
                for form in (path, os.path.realpath(path)):
                    self._by_path[form.rstrip("/")] = replacement
        # Longest first, so a data_dir inside the home directory becomes relative, not "~/...";
        # a path counts only up to a separator, so /srv/data never matches in /srv/data2.
        names = sorted(self._by_path, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, names)) + r")(?:(/)|(?!\.?[\w-]))"
                                   if names else r"(?!)")

    def __call__(self, message: str) -> str:
        return self._pattern.sub(self._replace, message)

    def _replace(self, match: re.Match) -> str:
        replacement = self._by_path[match.group(1)]
        if replacement == "." and match.group(2):  # "<data_dir>/default/cpu" -> "default/cpu"
            rest = match.string[match.end():match.end() + 1]
            return "" if rest and (rest.isalnum() or rest in "_-.*") else "./"
        return replacement + (match.group(2) or "")


def first_line(message: str) -> str:
    return message.strip().partition("\n")[0]
