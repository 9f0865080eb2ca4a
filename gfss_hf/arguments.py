"""Command-line flags generated from the package's dataclasses, so that a script's flags, types, choices, defaults
and help can never drift from the configuration they fill (`transformers.HfArgumentParser` does the parsing).

```python
>>> from transformers import HfArgumentParser
>>> from gfss_hf.adaptation import AdaptationConfig
>>> from gfss_hf.arguments import dataclass_flags
>>> parser = HfArgumentParser([dataclass_flags(AdaptationConfig, include=("steps", "gamma"))])
>>> parser.parse_args(["--steps", "5"]).steps
5
```
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterable

__all__ = ["dataclass_flags", "field_docs"]

# An entry of a docstring's `Args:` section: `name (`type`, ...): text`, continued on more indented lines.
_ENTRY = re.compile(r"^(?P<indent> +)(?P<name>\w+) \(.*?\):\s*(?P<text>.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """
    The description of each field in the `Args:` section of `cls`'s (HF-style) docstring, on one line.

    Args:
        cls (`type`): a documented dataclass.

    Returns:
        `dict[str, str]`: field name -> text (fields without an entry of their own are absent).
    """
    lines = (inspect.getdoc(cls) or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return {}
    docs: dict[str, list[str]] = {}
    current, indent = None, None
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):
            break  # the next section (`Example:` ...)
        match = _ENTRY.match(line)
        if match and (indent is None or len(match["indent"]) == indent):
            indent = len(match["indent"])
            current = match["name"]
            docs[current] = [match["text"]]
        elif current is not None and line.strip():
            docs[current].append(line.strip())
    return {name: " ".join(parts).strip() for name, parts in docs.items()}


def dataclass_flags(
    cls: type,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    optional: bool = False,
    group: str | None = None,
) -> type:
    """
    A dataclass of some fields of `cls` for `transformers.HfArgumentParser`: same names, types (a `Literal[...]`
    gives the flag's choices) and defaults, with the docstring's description as help.

    Args:
        cls (`type`): the configuration dataclass (e.g. `AdaptationConfig`).
        include (`Iterable[str]`, *optional*): only these fields (default: all).
        exclude (`Iterable[str]`, *optional*): fields left out (names `cls` does not have are ignored, so that a
            field removed from `cls` needs no edit here).
        optional (`bool`, *optional*, defaults to `False`): every flag defaults to `None` ("not given"), for flags
            that override a configuration file.
        group (`str`, *optional*): title of the `--help` group of these flags.

    Returns:
        `type`: a dataclass to pass to `HfArgumentParser`.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    wanted = None if include is None else set(include)
    specs = []
    for f in dataclasses.fields(cls):
        if (wanted is not None and f.name not in wanted) or f.name in set(exclude) or not f.init:
            continue
        kind = hints[f.name]
        if optional:
            kind, default = kind | None if not isinstance(kind, types.UnionType) else kind, None
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        specs.append((f.name, kind, dataclasses.field(default=default, metadata={"help": help_text})))
    flags = dataclasses.make_dataclass(f"{cls.__name__}Flags", specs)
    if group:
        flags._argument_group_name = group
    return flags
