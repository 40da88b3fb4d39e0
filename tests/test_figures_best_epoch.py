"""`make figures`' best-epoch table on small synthetic run rows: the best evaluation (`test_best/*`) beside the final
one, the median over seeds where a cell has the LoRA paper's 5 seeds, and nothing for runs without a best value."""

import pandas as pd

from loralab.figures.data import best_epoch_stats
from loralab.figures.output import Writer
from loralab.figures.sections import best_epoch_section

LORA_FINAL = [0.80, 0.82, 0.84, 0.86, 0.99]  # median 0.84, mean 0.862
LORA_BEST = [0.85, 0.86, 0.87, 0.88, 0.99]  # median 0.87


def runs(best: bool = True) -> pd.DataFrame:
    """lora r=8 with 5 seeds, lierra r=8 with 2; one lr-search side run of lora that the main setting leaves out."""
    rows = [("lora", seed, "k1", f, b) for seed, (f, b) in enumerate(zip(LORA_FINAL, LORA_BEST))]
    rows += [("lierra", 0, "k2", 0.70, 0.90), ("lierra", 1, "k2", 0.72, 0.92), ("lora", 0, "side", 0.10, 0.10)]
    frame = pd.DataFrame(
        [
            {"experiment": "e", "model": "m", "task": "t", "variant": v, "targets": "qv", "rank": 8, "seed": seed}
            | {"key": key, "lr": 1e-3, "test/accuracy": final, "test_best/accuracy": top}
            for v, seed, key, final, top in rows
        ]
    )
    return frame if best else frame.drop(columns="test_best/accuracy")


def test_best_epoch_stats_are_the_main_settings_seeds():
    stats = best_epoch_stats(runs(), "test/accuracy").set_index("variant")
    assert stats.loc["lora", "n"] == 5 and stats.loc["lierra", "n"] == 2  # the side run is left out
    assert abs(stats.loc["lora", "final_median"] - 84.0) < 1e-9 and abs(stats.loc["lora", "best_median"] - 87.0) < 1e-9
    assert abs(stats.loc["lora", "final_mean"] - 86.2) < 1e-9 and abs(stats.loc["lierra", "best_mean"] - 91.0) < 1e-9


def test_best_epoch_table_beside_the_final_with_medians_for_five_seeds(tmp_path):
    w = Writer(tmp_path, "synthetic")
    best_epoch_section(w, runs(), "test/accuracy")
    assert w.written == ["best_epoch"]
    table = pd.read_csv(tmp_path / "best_epoch.csv", index_col=[0, 1, 2])
    lora, lierra = table.loc[("LoRA", "Wq,Wv", "r=8")], table.loc[("LieRA", "Wq,Wv", "r=8")]
    assert (
        lora["test/accuracy (final)"] == "86.2 ± 7.5 (n=5)" and lora["test_best/accuracy (best)"] == "89.0 ± 5.7 (n=5)"
    )
    assert lora["test/accuracy (final) median"] == "84.0 (n=5)"
    assert lora["test_best/accuracy (best) median"] == "87.0 (n=5)"
    assert (
        lierra["test_best/accuracy (best)"] == "91.0 ± 1.4 (n=2)" and lierra["test_best/accuracy (best) median"] == "--"
    )
    assert "median over seeds" in (tmp_path / "best_epoch.md").read_text()


def test_no_median_columns_without_five_seeds_and_no_table_without_best_values(tmp_path):
    few = runs()
    few = few[few.seed < 3]
    w = Writer(tmp_path / "few", "synthetic")
    best_epoch_section(w, few, "test/accuracy")
    assert list(pd.read_csv(tmp_path / "few" / "best_epoch.csv", index_col=[0, 1, 2]).columns) == [
        "test/accuracy (final)",
        "test_best/accuracy (best)",
    ]
    for frame in (runs(best=False), runs().assign(**{"test_best/accuracy": float("nan")})):
        w = Writer(tmp_path / "none", "synthetic")
        best_epoch_section(w, frame, "test/accuracy")
        assert w.written == [] and not (tmp_path / "none" / "best_epoch.csv").exists()
