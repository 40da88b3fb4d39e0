"""The protocol table of each LieRA / LoRA preset README against the composed preset, so the two cannot drift apart.

A row's loralab cell holds checks in backticks: `key=value` (the preset as composed) or `a=b c=d: key=value` (the
preset with those overrides); `hydra.*` keys are read from the composed Hydra config (the preset's sweep).
"""

import math
import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, ROOT

PRESETS = ["liera_glue", "liera_commonsense", "lora_rank", "lora_subspace", "lora_amplification", "cpu_repro_long"]
HEADER = ["setting", "loralab", "official", "source", "deviation and why"]
# the settings every table covers (the list), by the name in its first column
REQUIRED = [
    "model",
    "targets",
    "rank",
    "α",
    "scaling",
    "lr",
    "batch",
    "epochs / steps",
    "warmup",
    "schedule",
    "weight decay",
    "precision",
    "max length",
    "data filtering",
    "validation & checkpoint selection",
    "decoding",
    "metric",
    "seeds",
]
CHECK = re.compile(r"`(?:([^`:]+): )?([\w.]+)=([^`]*)`")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def protocol_table(preset: str) -> list[dict[str, str]]:
    lines = (ROOT / "experiments" / preset / "README.md").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and cells(line) == HEADER]
    assert len(starts) == 1, f"{preset}: one protocol table with the header {HEADER}"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        assert len(row) == len(HEADER), f"{preset}: {line!r} has {len(row)} cells"
        rows.append(dict(zip(HEADER, row)))
    return rows


def checks(cell: str) -> list[tuple[tuple[str, ...], str, str]]:
    return [(tuple(over.split()) if over else (), key, value) for over, key, value in CHECK.findall(cell)]


def parse(value: str):
    return OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]  # YAML as the config files read it


def same(actual, expected) -> bool:
    if OmegaConf.is_config(actual):
        actual = OmegaConf.to_container(actual, resolve=True)
    if isinstance(expected, float) or (isinstance(actual, float) and isinstance(expected, int)):
        return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-9)
    return actual == expected


@pytest.fixture(scope="module")
def hydra_config():
    """The composed Hydra config of a preset (sweep parameters), which compose_cfg leaves out."""
    cache = {}

    def _compose(preset: str, overrides: tuple[str, ...]):
        if (preset, overrides) not in cache:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                overrides_list = [f"experiment={preset}", *overrides]
                cache[preset, overrides] = compose("config", overrides=overrides_list, return_hydra_config=True)
            GlobalHydra.instance().clear()
        return cache[preset, overrides]

    return _compose


@pytest.mark.parametrize("preset", PRESETS)
def test_protocol_table_matches_the_composed_preset(preset, compose_cfg, hydra_config):
    rows = protocol_table(preset)
    settings = [row["setting"] for row in rows]
    assert [s for s in REQUIRED if s not in settings] == [], f"{preset}: settings missing from the table"
    composed = {}
    for row in rows:
        found = checks(row["loralab"])
        assert found, f"{preset}: row {row['setting']!r} has no `key=value` check in its loralab column"
        assert row["official"] and row["source"] and row["deviation and why"], f"{preset}: {row['setting']!r}"
        for overrides, key, value in found:
            if key.startswith("hydra."):  # the sweeper's parameters are strings ("0,1,2,3,4")
                actual, expected = str(OmegaConf.select(hydra_config(preset, overrides), key)), value
                assert actual == expected, f"{preset} {row['setting']!r}: {key} is {actual!r}, the table says {value}"
                continue
            if overrides not in composed:
                composed[overrides] = compose_cfg(f"experiment={preset}", *overrides)
            actual, expected = OmegaConf.select(composed[overrides], key, throw_on_missing=True), parse(value)
            assert same(actual, expected), f"{preset} {row['setting']!r}: {key} is {actual!r}, the table says {value}"


def test_the_checks_can_fail(compose_cfg):
    """The parser reads what the tables write, and a wrong value is caught."""
    assert checks("`train.lr=0.0002`; `model=llama3_8b variant=lierra: train.lr=0.001` and `W0 ⊙ sBA`") == [
        ((), "train.lr", "0.0002"),
        (("model=llama3_8b", "variant=lierra"), "train.lr", "0.001"),
    ]
    cfg = compose_cfg("experiment=lora_rank")
    assert same(cfg.train.lr, parse("5e-4")) and not same(cfg.train.lr, parse("5e-3"))
    assert same(cfg.model.target_sets.qv, parse("[attention.self.query, attention.self.value]"))
    assert same(cfg.train.precision, parse('"no"')) and not same(cfg.train.precision, parse("no"))  # YAML: no = false
