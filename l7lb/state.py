# -*- test-case-name: tests.test_admin -*-
"""
Runtime changes (backends registered, routes added through the admin API)
kept as configuration sections on top of the file, and saved so that they
survive a restart and a reload.

The state is the same INI vocabulary as the file (section name, key, value
as text), so a change is validated by loading the file with the change on
top, with the very messages C{--check} gives. It is saved atomically: a
temporary file in the same directory, flushed to disk, renamed over the old.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

from l7lb.config import Config, ConfigError, Sections, effective_sections, load


@dataclass(frozen=True)
class RuntimeState:
    """
    Sections that replace or add to the file's, and sections left out.
    """

    sections: Sections = field(default_factory=dict)
    removed: tuple[str, ...] = ()

    def with_section(self, name: str, values: dict[str, str]) -> RuntimeState:
        sections = dict(self.sections)
        sections[name] = dict(values)
        return RuntimeState(sections, tuple(r for r in self.removed if r != name))

    def without_section(self, name: str, in_file: bool) -> RuntimeState:
        sections = {k: v for k, v in self.sections.items() if k != name}
        removed = self.removed + (
            (name,) if in_file and name not in self.removed else ()
        )
        return RuntimeState(sections, removed)

    def config(self, path: str, text: str | None = None) -> Config:
        """
        The file with these changes on top, validated (C{text} is the file's
        content when it was read already).

        @raise ConfigError: with every problem, as C{--check} words them.
        """
        return load(path, self.sections, self.removed, text)

    def effective(self, path: str) -> Sections:
        return effective_sections(path, self.sections, self.removed)


def read_state(path: str | None) -> RuntimeState:
    """
    The saved runtime changes; none when there is no state file yet.

    @raise ConfigError: when the file exists but cannot be used.
    """
    if path is None or not os.path.exists(path):
        return RuntimeState()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        sections = {
            str(name): {str(k): str(v) for k, v in values.items()}
            for name, values in data.get("sections", {}).items()
        }
        removed = tuple(str(name) for name in data.get("removed", []))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError([f"{path}: cannot read the runtime state: {e}"]) from None
    return RuntimeState(sections, removed)


def save_state(path: str, state: RuntimeState) -> None:
    """
    Write the state where C{path} names, atomically and durably.
    """
    directory = os.path.dirname(os.path.abspath(path))
    data = json.dumps(
        {"sections": state.sections, "removed": list(state.removed)},
        indent=2,
        sort_keys=True,
    )
    fd, temporary = tempfile.mkstemp(prefix=".l7lb-state-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
