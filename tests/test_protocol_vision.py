"""liera_vtab's protocol table (experiments/liera_vtab/README.md) against the composed preset, its lr-search command,
and the VTAB read-out (lr selection on val200, last-epoch headline and NOAH's best-of-evaluations)."""

import importlib.util
import math
import re
import shlex
from types import SimpleNamespace

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, ROOT

README = ROOT / "experiments/liera_vtab/README.md"
SETTING = re.compile(r"`([\w./]+)=([^`]*)`")


def protocol_rows() -> list[dict[str, str]]:
    text = README.read_text().split("## Protocol", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["setting", "loralab", "paper / official", "source", "deviation and why"]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def search_command() -> list[str]:
    """The README's lr-search command, each swept list at its first value (compose takes one job)."""
    line = next(line for line in README.read_text().splitlines() if "task.train_split=train800 " in line)
    args = shlex.split(line.replace("$VTAB_DIR", "/data/vtab-1k"))
    overrides = [a for a in args[args.index("run.py") + 1 :] if a != "-m"]
    return [o.split(",")[0] if "=" in o else o for o in overrides]


def composed(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def same(actual, written: str) -> bool:
    try:
        return math.isclose(float(actual), float(written), rel_tol=1e-12)
    except (TypeError, ValueError):
        return str(actual).lower() == written.lower()


def test_every_protocol_row_matches_the_composed_preset():
    rows = protocol_rows()
    assert len(rows) >= 15 and all(r["deviation and why"] for r in rows)
    search = composed(search_command())
    for row in rows:
        cell = row["loralab"]
        settings = SETTING.findall(cell)
        assert settings, f"row {row['setting']!r} names no checkable setting"
        (key, value), extra = settings[0], [f"{k}={v}" for k, v in settings[1:]]
        if "search command" in cell:
            cfg = search
        else:
            cfg = composed(["experiment=liera_vtab", *extra])
        actual = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert same(actual, value), f"{row['setting']}: README says {key}={value}, the preset composes {actual!r}"


def test_search_command_trains_on_train800_and_returns_val200_accuracy():
    cfg = composed(search_command())
    assert cfg.task.train_split == "train800" and cfg.objective == "val/accuracy"
    assert cfg.hydra.sweeper.params.task.count(",") == 18 and cfg.targets == "conv"


def load_report():
    spec = importlib.util.spec_from_file_location("vtab_report", ROOT / "experiments/liera_vtab/vtab_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_record(split, test=None, curve=None):
    return SimpleNamespace(
        config={"task": {"train_split": split}},
        metrics={} if test is None else {"test/accuracy": test},
        curves={} if curve is None else {"test/accuracy": curve},
    )


def test_lr_selection_commands_and_table():
    report = load_report()
    rows = []
    for variant, accs in (("lora", {1e-3: 0.70, 5e-4: 0.75, 2e-3: 0.75}), ("lierra", {1e-3: 0.80, 5e-4: 0.60})):
        for lr, acc in accs.items():
            rows.append(dict(variant=variant, task="vtab_dtd", rank=8, lr=lr, record=fake_record("train800")))
            rows[-1]["val/accuracy"] = acc
    finals = [
        ("lora", 5e-4, 0.71, [[100, 0.74], [200, 0.72]]),
        ("lora", 1e-3, 0.99, None),  # not the chosen lr: left out
        ("lierra", 1e-3, 0.78, None),
    ]
    for variant, lr, test, curve in finals:
        rows.append(
            dict(variant=variant, task="vtab_dtd", rank=8, lr=lr, record=fake_record("train800val200", test, curve))
        )
        rows[-1]["test/accuracy"], rows[-1]["val/accuracy"] = test, math.nan
    runs = pd.DataFrame(rows)
    chosen = report.chosen_lrs(runs).set_index("variant")
    assert chosen.loc["lora", "lr"] == 5e-4  # tie between 5e-4 and 2e-3: the smaller lr
    assert chosen.loc["lierra", "lr"] == 1e-3 and chosen.loc["lierra", "lrs_tried"] == [5e-4, 1e-3]
    commands = report.final_commands(chosen.reset_index())
    assert "variant=lora task=vtab_dtd rank=8 train.lr=0.0005" in commands[1]
    table = report.vtab_table(runs, chosen.reset_index()).set_index("variant")
    assert table.loc["lora", "last_epoch"] == pytest.approx(0.71)  # headline: the last epoch
    assert table.loc["lora", "best_of_evaluations_noah"] == pytest.approx(0.74)  # NOAH: the best evaluation
    assert math.isnan(table.loc["lierra", "best_of_evaluations_noah"])  # none recorded: NaN, never the last epoch
