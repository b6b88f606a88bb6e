"""YAML files whose errors name their line: studies, gates files and regression suites read through here.

`read_yaml(path, what)` parses with a SafeLoader (plain data only, never objects) that records each mapping's
first line (1-based) under the key `__line__` and refuses a key given twice in one mapping (YAML would keep
the last one silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nemo_adapt.errors import ConfigError

LINE = "__line__"
"""The key under which every mapping records its first line."""


class LineLoader(yaml.SafeLoader):
    """A SafeLoader keeping each mapping's line under `LINE` and refusing a key given twice."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.value in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key_node.value!r} is given "
                                  f"twice (also on line {seen[key_node.value]})")
            seen[key_node.value] = key_node.start_mark.line + 1
        mapping = super().construct_mapping(node, deep=deep)
        mapping[LINE] = node.start_mark.line + 1
        return mapping


def read_yaml(path: str | Path, what: str) -> tuple[Any, bytes]:
    """Parse a YAML file, keeping lines.

    Args:
        path: the file.
        what: what it is, for messages ("study", "gates file", "suite").

    Returns:
        (the document, the file's bytes — for its content hash).

    Raises:
        ConfigError: no such file, not UTF-8, not valid YAML (with its line), or a key given twice (both lines).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r}: no such file")
    data = path.read_bytes()
    try:
        loader = LineLoader(data.decode("utf-8"))
        loader.name = str(path)
        try:
            return loader.get_single_data(), data
        finally:
            loader.dispose()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path}: not UTF-8 text ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{at}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
