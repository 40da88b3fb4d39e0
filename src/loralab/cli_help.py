"""The text of `python run.py --help`: the option groups, their options and the presets, read from `conf/`.

Hydra's own listing (`$APP_CONFIG_GROUPS`) shows every ConfigStore entry and knows nothing of what an option is
for; this one lists the YAML options of each group with its default, and each variant and preset with the first
line of its comment. Imports nothing heavy: `--help` and tab completion stay fast.
"""

from __future__ import annotations

import re
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "task", "variant", "logger")  # the app's option groups, in the order a user picks them
WIDTH = 116


def _options(group: str) -> list[Path]:
    return sorted((CONF / group).glob("*.yaml"))


def _description(path: Path) -> str:
    """The first comment line of an option file that is not a Hydra directive, shortened to one line."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            text = line.lstrip("# ").strip()
            return text if len(text) <= 88 else text[:87].rsplit(" ", 1)[0] + " …"
    return ""


def _defaults() -> dict[str, str]:
    """group -> default option, from the primary config's defaults list."""
    found = re.findall(r"^\s*-\s*(\w+):\s*(\w+)", (CONF / "config.yaml").read_text(), flags=re.M)
    return dict(found)


def _wrap(items: list[str], indent: int) -> list[str]:
    lines, line = [], ""
    for item in items:
        if line and indent + len(line) + len(item) + 2 > WIDTH:
            lines.append(line + ",")
            line = item
        else:
            line = f"{line}, {item}" if line else item
    return [*lines, line]


def options_text() -> str:
    """Groups with their options (default marked), then every variant and preset with its one-line description."""
    defaults = _defaults()
    out = ["Option groups (group=option; * = the default):"]
    for group in GROUPS:
        names = [p.stem + ("*" if defaults.get(group) == p.stem else "") for p in _options(group)]
        wrapped = _wrap(names, 12)
        out += [f"  {group:<10}{wrapped[0]}", *(f"  {'':<10}{line}" for line in wrapped[1:])]
    out += ["", "Variants (variant=<name>):"]
    out += [f"  {p.stem:<20}{_description(p)}" for p in _options("variant")]
    out += ["", "Presets (experiment=<name>; a preset that defines a sweep runs it with -m):"]
    out += [f"  {p.stem:<20}{_description(p)}" for p in _options("experiment")]
    return "\n".join(out).replace("$", "$$")  # the help template is a string.Template: a literal $ is $$
