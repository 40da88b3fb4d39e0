"""Cross-run analyses: LoRA Fig. 3/4 subspace similarity φ(i, j) between pairs of runs, for every adapted matrix.

    python -m loralab.analyze                                  # every completed run under results/
    python -m loralab.analyze --experiment lora_subspace --variant lora --rank-pairs 8:64 --seed-pairs 1:2

Pairs are formed among runs that differ only in rank (same seed: Fig. 3, r=8 vs r=64) or only in seed (same rank:
Fig. 4, two seeds at r=64). For each pair and matrix, φ grids on the A factors' right singular vectors (the paper),
the B factors' left singular vectors (its footnote 7) and ΔW's right singular vectors (fair to LoRA-GA and LieRA),
next to two random Gaussian matrices of the same shapes. Runs are paired by their identity (loralab.record): same
experiment, model, task, variant, target set and hyperparameters. One JSON per pair under
`<results>/<experiment>/analysis/`, holding both runs' identities; `make figures` draws them. Runs with
`analysis_steps` are also compared at each step both analysed (`by_step`: φ summaries). Also run by the Hydra
callback after a sweep.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from loralab.analysis.subspace import phi_grid, random_phi_grid
from loralab.io import write_json_atomic
from loralab.results import load_runs

log = logging.getLogger(__name__)

BASES = ("A_right", "B_left", "dW_right")
# runs of one group share everything but rank and seed: the same setup, hyperparameters and target set
GROUP = ["experiment", "model", "task", "variant", "targets", "key"]


def _pairs(frame: pd.DataFrame, rank_pairs, seed_pairs, seed_pair_rank):
    for _, group in frame.groupby(GROUP, dropna=False):
        runs = {(int(r.identity.rank), int(r.identity.seed)): r for r in group.record}
        for r1, r2 in rank_pairs:
            for seed in sorted({s for _, s in runs}):
                if (r1, seed) in runs and (r2, seed) in runs:
                    yield "rank", runs[(r1, seed)], runs[(r2, seed)]
        for s1, s2 in seed_pairs:
            if (seed_pair_rank, s1) in runs and (seed_pair_rank, s2) in runs:
                yield "seed", runs[(seed_pair_rank, s1)], runs[(seed_pair_rank, s2)]


def _bases_path(root: Path, record) -> Path | None:
    relative = record.artifacts.get("bases")
    return root / relative if relative and (root / relative).exists() else None


def compare(bases_file_a: Path, bases_file_b: Path, seed: int = 0) -> dict:
    """φ grids between the saved bases of two runs, per matrix and basis kind, plus the random baseline."""
    bases_a, bases_b = load_file(str(bases_file_a)), load_file(str(bases_file_b))
    gen = torch.Generator().manual_seed(seed)
    layers, random = {}, {}
    for key in sorted(set(bases_a) & set(bases_b)):
        name, kind = key.split("|")
        if kind not in BASES:
            continue
        U1, U2 = bases_a[key], bases_b[key]
        grid = phi_grid(U1, U2)
        shape = (U1.shape[0], U1.shape[1], U2.shape[1])
        tag = "x".join(map(str, shape))
        if tag not in random:  # one baseline per (dim, r1, r2): two Gaussian matrices of these shapes
            random[tag] = np.round(random_phi_grid(*shape, generator=gen), 4).tolist()
        layers.setdefault(name, {})[kind] = {"phi": np.round(grid, 4).tolist(), "random": tag}
    return {"layers": layers, "random": random}


def summary(result: dict) -> pd.DataFrame:
    rows = []
    for name, kinds in result["layers"].items():
        for kind, entry in kinds.items():
            phi, rand = np.array(entry["phi"]), np.array(result["random"][entry["random"]])
            rows.append(
                {
                    "layer": name,
                    "basis": kind,
                    "phi_11": phi[0, 0],
                    "phi_mean": phi.mean(),
                    "random_11": rand[0, 0],
                    "random_mean": rand.mean(),
                }
            )
    return pd.DataFrame(rows)


def _by_step(root: Path, a, b) -> list[dict]:
    """The pair's φ summary at every `analysis_steps` step both runs analysed (training-length figure)."""
    steps_a = {e["step"]: e["bases"] for e in a.analysis_by_step if e.get("bases")}
    steps_b = {e["step"]: e["bases"] for e in b.analysis_by_step if e.get("bases")}
    out = []
    for step in sorted(set(steps_a) & set(steps_b)):
        files = [root / steps_a[step], root / steps_b[step]]
        if all(f.exists() for f in files):
            out.append({"step": step, "summary": summary(compare(*files)).round(4).to_dict("records")})
    return out


def _side(record) -> dict:
    return {**record.identity.columns(), "run_dir": record.run_dir}


def analyze_runs(
    root: str | Path, frame: pd.DataFrame, rank_pairs=((8, 64),), seed_pairs=((1, 2),), seed_pair_rank=64
) -> list[Path]:
    """φ results for every rank / seed pair among the runs of `frame` (rows of `load_runs(root)`), one JSON per pair
    in `<root>/<experiment>/analysis/`, named after the pair's identities."""
    root, written = Path(root), []
    pairs = list(_pairs(frame, rank_pairs, seed_pairs, seed_pair_rank))
    for i, (kind, a, b) in enumerate(pairs, 1):  # each a line in the sweep's log (Hydra's console, SLURM)
        log.info("cross-run analysis %d/%d: %s pair %s vs %s", i, len(pairs), kind, a.run_dir, b.run_dir)
        files = [_bases_path(root, r) for r in (a, b)]
        if None in files:
            print(f"[loralab.analyze] skip {kind} pair {a.run_dir} / {b.run_dir}: no saved bases (analyses=[]?)")
            continue
        ia = a.identity
        result = compare(*files)
        result.update(kind=kind, **{k: getattr(ia, k) for k in GROUP}, a=_side(a), b=_side(b))
        table = summary(result)
        result["summary"] = table.round(4).to_dict("records")
        result["by_step"] = _by_step(root, a, b)
        pair = f"r{ia.rank}s{ia.seed}-vs-r{b.identity.rank}s{b.identity.seed}"
        name = f"subspace-{ia.model}-{ia.task}-{ia.variant}-{ia.targets}-{ia.key}-{pair}"
        path = root / ia.experiment / "analysis" / f"{name}.json"
        write_json_atomic(path, result)
        written.append(path)
        means = table.groupby("basis")[["phi_11", "random_11"]].mean().round(3)
        print(f"[loralab.analyze] {path}\n{means.to_string()}")
    return written


def _pair_list(values):
    return [tuple(int(x) for x in v.split(":")) for v in values]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    for column in ("experiment", "model", "task", "variant"):
        parser.add_argument(f"--{column}", nargs="+")
    parser.add_argument("--rank-pairs", nargs="+", default=["8:64"], help="r1:r2 pairs at equal seed (Fig. 3)")
    parser.add_argument("--seed-pairs", nargs="+", default=["1:2"], help="s1:s2 pairs at --seed-pair-rank (Fig. 4)")
    parser.add_argument("--seed-pair-rank", type=int, default=64)
    args = parser.parse_args(argv)
    filters = {c: getattr(args, c) for c in ("experiment", "model", "task", "variant") if getattr(args, c)}
    frame = load_runs(args.results, status="completed", **filters)
    if frame.empty:
        raise SystemExit(f"no completed runs under {args.results} matching {filters}")
    pairs = _pair_list(args.rank_pairs), _pair_list(args.seed_pairs), args.seed_pair_rank
    written = analyze_runs(args.results, frame, *pairs)
    print(f"[loralab.analyze] {len(written)} pair(s) written")


if __name__ == "__main__":
    main()
