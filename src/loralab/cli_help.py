"""The text of `python run.py --help`: the option groups, their options and the presets, read from `conf/`.

Hydra's help lists every ConfigStore entry, knows nothing of what an option is for, and composes every option of
every group to do it (about 1.5 s, however short the template). `run.py` prints this text instead, before Hydra
starts: the YAML options of each group with its default, each variant and preset with the first line of its
comment. Hydra's own flags stay under `--hydra-help`.
"""

from __future__ import annotations

import re
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "task", "variant", "logger")  # the app's option groups, in the order a user picks them
WIDTH = 116


def _options(group: str) -> list[Path]:
    return sorted((CONF / group).glob("*.yaml"))


def _description(path: Path, limit: int = 88) -> str:
    """The first comment line of an option file that is not a Hydra directive, shortened to `limit` characters."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            text = line.lstrip("# ").strip()
            return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + " …"
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
    described = {"variant": _options("variant"), "experiment": _options("experiment")}
    # one name column for both lists, as wide as the longest name (liera_coco_mask2former) plus a gap
    column = max(20, 2 + max(len(p.stem) for paths in described.values() for p in paths))
    out += ["", "Variants (variant=<name>):"]
    limit = min(88, WIDTH - 2 - column)
    out += [f"  {p.stem:<{column}}{_description(p, limit)}" for p in described["variant"]]
    out += ["", "Presets (experiment=<name>; a preset that defines a sweep runs it with -m):"]
    out += [f"  {p.stem:<{column}}{_description(p, limit)}" for p in described["experiment"]]
    return "\n".join(out)


USAGE = """\
loralab: LoRA, LoRA-GA and LieRA ablations side by side. One job = data -> model -> variant -> train ->
evaluate -> one result JSON (+ adapter weights, + one W&B run).

Usage:
  python run.py [group=option ...] [key=value ...]            one job (default: MiniLM + LoRA r=8 on tweets)
  python run.py -m variant=lora,loraga,lierra rank=1,4,8,64   a sweep: results table + cross-run analyses
  python run.py experiment=<preset> [-m]                      a paper's experiment
  python run.py [overrides] --cfg job                         print the composed config
  make figures [EXPERIMENT=<name>]                            paper-style figures and tables from results/
"""
FOOTER = """\
Any field of the composed config can be overridden (foo.bar=value). Hydra's own flags: --hydra-help.
Design and math: ../shared/DESIGN.md; each preset's protocol: experiments/<preset>/README.md."""


def help_text() -> str:
    return f"{USAGE}\n{options_text()}\n\n{FOOTER}"
