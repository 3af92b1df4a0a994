"""The configuration reference (docs/configuration.md), generated from the typed config in fedsim.schema.

A field's help is the comment kept next to it in fedsim/schema.py: the `#` lines right above it
and/or a `#` comment at the end of its line; a section's description is its class docstring. The
comments are read from the source (tokenize), so the schema stays plain dataclasses and the help
cannot drift from the code: tests/test_docs.py fails when a field has none or when
docs/configuration.md differs from `fedsim config reference`.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize

import yaml

from fedsim.schema import Config

REGENERATE = "fedsim config reference --output docs/configuration.md"

INTRO = f"""# Configuration reference

<!-- Generated from fedsim/schema.py by `{REGENERATE}`; do not edit by hand. -->

One YAML file describes an experiment (see `configs/`). Every key has a default, so a config names
only what it changes; `--set key=value` overrides any key on the command line (the value is read as
YAML: `--set train.lr=1e-3`, `--set model.lora.target_modules=[q_proj,v_proj]`). An unknown key or a
value of the wrong type is an error that names the key. `fedsim config show CONFIG [--set ...]`
prints a config with every default filled in.
"""


def field_help(cls) -> dict[str, str]:
    """{field name: its help} from the comments next to each field of dataclass `cls`."""
    source = inspect.getsource(cls)
    comments = {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out, above = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments.get(number, ""))
            continue
        m = re.match(r"    (\w+)\s*:", line)
        if m and m.group(1) in names:
            text = " ".join(above + ([comments[number]] if number in comments else []))
            out[m.group(1)] = text
        above = []
    return out


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _yaml(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def sections(cls=Config, prefix: str = ""):
    """(prefix, class, scalar fields) for `cls` and every nested section, depth first."""
    scalars = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(_default(f))]
    yield prefix, cls, scalars
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_default(f)):
            yield from sections(type(_default(f)), f"{prefix}{f.name}.")


def missing_help() -> list[str]:
    """Config keys whose field has no help comment in fedsim/schema.py."""
    out = []
    for prefix, cls, scalars in sections():
        helps = field_help(cls)
        out += [prefix + f.name for f in scalars if not helps.get(f.name)]
    return out


def reference_markdown() -> str:
    parts = [INTRO]
    for prefix, cls, scalars in sections():
        if not scalars:
            continue
        title = f"`{prefix[:-1]}`" if prefix else "Top level"
        parts.append(f"\n## {title}\n")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # not dataclass's generated one
            parts.append(" ".join(inspect.cleandoc(cls.__doc__).split()) + "\n")
        helps = field_help(cls)
        parts.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for f in scalars:
            parts.append(f"| `{prefix}{f.name}` | `{_cell(str(f.type))}` | `{_cell(_yaml(_default(f)))}` "
                         f"| {_cell(helps.get(f.name, ''))} |\n")
    return "".join(parts)
