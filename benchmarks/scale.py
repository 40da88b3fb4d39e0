"""Paper scale: one whole LoRA-GA job on a Llama-architecture model, stage by stage, old code path vs new.

A Llama model built from a config with random weights (no download), LoRA-GA r=8 on every linear layer of every
block (q, k, v, o, gate, up, down: the `loraga_llama` preset's targets), fixture token batches, every per-run
analysis on (spectrum, amplification, subspace_bases, first_step), two optimizer steps. Each (size, code path)
runs in a fresh subprocess; the old path is the commit before the streaming analyses (`--old-rev`, default
b26fadb), extracted with `git archive` and put first on PYTHONPATH, or an extracted copy of its `src/` given as
`--old-src DIR` (where there is no .git, e.g. a working-tree copy on an accelerator machine), or left out with
`--no-old`; the new one is this checkout's `src/`. The report is rewritten after each size, so a run cut short
keeps the sizes that finished.

    python benchmarks/scale.py --sizes tiny                       # a smoke check (seconds)
    python benchmarks/scale.py --sizes 0.25b,1b --old-layers 7    # the report (results/benchmarks/scale.md)
    git archive b26fadb src | tar -x -C .old                      # then, without .git: --old-src .old/src

Stages (both paths run the same driver and the runner's own `analyse` stage):
gradient estimate (LoRA-GA's N micro-batches), init (the rest of `variant.prepare`: SVDs, W0 − s·B0·A0), probe
(every analysis's before/after-prepare work: the first-step probe and, on the old path, the W0 copies), one
training step (the mean of two AdamW steps), analyses (the runner's `analyse` stage without the save), save.
Memory: the peak above the loaded model (model + batches), as process RSS sampled every 5 ms (freed memory is
handed back to the OS between stages with malloc_trim) and, on CUDA, the allocator's peak.
`--old-layers K` times the old analyses on the first K adapted matrices only and scales their time linearly to
all of them (the old analyses are per-matrix full SVDs: linear in the matrix count); the report says so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # hidden, layers, intermediate, heads, vocab
    "tiny": (256, 2, 688, 4, 1000),
    "0.25b": (1024, 16, 2816, 8, 32000),
    "1b": (2048, 18, 5632, 16, 32000),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANALYSES = ["spectrum", "amplification", "subspace_bases", "first_step"]
STAGES = ["gradient estimate", "init", "probe", "training step", "analyses", "save"]


class Meter:
    """Peak RSS (sampled) and CUDA allocator peak of a block, above a baseline."""

    def __init__(self, baseline_rss: int, baseline_cuda: int):
        import psutil  # noqa: PLC0415
        import torch  # noqa: PLC0415

        self.torch, self.proc = torch, psutil.Process()
        self.baseline_rss, self.baseline_cuda = baseline_rss, baseline_cuda

    def __enter__(self):
        trim()
        self.cuda = self.torch.cuda.is_available()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.peak, self.stop = self.proc.memory_info().rss, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.start
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.rss_mb = (self.peak - self.baseline_rss) / 2**20
        self.cuda_mb = (self.torch.cuda.max_memory_allocated() - self.baseline_cuda) / 2**20 if self.cuda else None


def trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS then also carries memory freed earlier
        pass


def timed(fn, total: list):
    """`fn`, adding its wall time into total[0] (a stage inside another: the estimate in prepare, save in analyse)."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    return wrapper


def build(args, torch):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    hidden, layers, intermediate, heads, vocab = SIZES[args.size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(args.length, 64),
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config).to(args.device)
    gen = torch.Generator().manual_seed(1)

    def batch(size):
        ids = torch.randint(3, vocab, (size, args.length), generator=gen).to(args.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    grad_batches = [batch(1) for _ in range(args.grad_batches)]
    train_batches = [batch(args.batch) for _ in range(2)]
    return model, grad_batches, train_batches


def child(args) -> dict:
    """One whole job on one code path (whatever `loralab` is first on PYTHONPATH)."""
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    import loralab  # noqa: PLC0415
    import loralab.variants.loraga as loraga_module  # noqa: PLC0415
    from loralab import runner  # noqa: PLC0415
    from loralab.analysis.per_run import make_analyses  # noqa: PLC0415
    from loralab.targets import find_targets  # noqa: PLC0415
    from loralab.trackers import Tracker  # noqa: PLC0415
    from loralab.variants import PrepareContext, get_variant  # noqa: PLC0415
    from loralab.variants.loraga import LoraGAVariantConfig  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    model, grad_batches, train_batches = build(args, torch)
    targets = find_targets(model, LINEAR)
    modules = dict(model.named_modules())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trim()
    base_rss = psutil.Process().memory_info().rss
    base_cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    meter = lambda: Meter(base_rss, base_cuda)  # noqa: E731
    out = {"path": args.path, "loralab": list(loralab.__path__)[0], "stages": {}}

    def record(stage, m, wall=None):
        out["stages"][stage] = {"wall_s": m.wall if wall is None else wall, "rss_mb": m.rss_mb, "cuda_mb": m.cuda_mb}

    variant = get_variant("loraga")(LoraGAVariantConfig(name="loraga", grad_batches=args.grad_batches), 8)
    analyses = make_analyses(ANALYSES, 8, targets)
    estimate_time = [0.0]
    loraga_module.estimate_gradients = timed(loraga_module.estimate_gradients, estimate_time)
    with meter() as m_before:
        for analysis in analyses:
            analysis.before_prepare(model, train_batches[0])
    with meter() as m_prepare:
        batches = lambda size: iter(grad_batches)
        fields = PrepareContext.__dataclass_fields__  # the old code path's context has no first_batches
        ctx = PrepareContext(
            train_batches=batches, total_steps=2, **({"first_batches": batches} if "first_batches" in fields else {})
        )
        model = variant.prepare(model, targets, [], ctx)
    record("gradient estimate", m_prepare, estimate_time[0])
    record("init", m_prepare, m_prepare.wall - estimate_time[0])  # the memory column: the whole prepare
    with meter() as m_after:
        for analysis in analyses:
            analysis.after_prepare(model, variant)
    record("probe", m_after, m_before.wall + m_after.wall)
    out["stages"]["probe"]["rss_mb"] = max(m_before.rss_mb, m_after.rss_mb)
    if m_after.cuda:
        out["stages"]["probe"]["cuda_mb"] = max(m_before.cuda_mb, m_after.cuda_mb)

    groups = variant.param_groups(model, 2e-5, 0.0)
    optimizer = torch.optim.AdamW(groups, lr=2e-5)
    model.train()
    with meter() as m_train:
        for batch in train_batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    record("training step", m_train, m_train.wall / len(train_batches))

    n_analysed = len(targets)
    if args.old_layers and args.path == "old":  # time the old per-matrix SVDs on K matrices, scale linearly
        real_deltas = variant.delta_weights
        keep = set(targets[: args.old_layers])
        variant.delta_weights = lambda m: {k: v for k, v in real_deltas(m).items() if k in keep}
        n_analysed = len(keep)
    save_time = [0.0]
    variant.save = timed(variant.save, save_time)
    with tempfile.TemporaryDirectory() as tmp:
        job = SimpleNamespace(
            record=SimpleNamespace(delta_fro_norms={}, analysis={}, steps=2, run_dir="scale", artifacts={}),
            model=model,
            variant=variant,
            analyses=analyses,
            targets=targets,
            main=True,
            tracker=Tracker(),
            out=Path(tmp) / "run",
            root=Path(tmp),
            cfg=OmegaConf.create({"save_weights": True, "logger": {}, "analysis_steps": []}),
            accelerator=SimpleNamespace(unwrap_model=lambda m: m),
            relative=lambda p: str(p),
        )
        job.out.mkdir()
        with meter() as m_analyse:
            runner.analyse(job)
    analyses_wall = (m_analyse.wall - save_time[0]) * len(targets) / n_analysed
    record("analyses", m_analyse, analyses_wall)
    record("save", m_analyse, save_time[0])
    tol = [r.get("proj_W_tol") for r in job.record.analysis.get("amplification", [])]
    out |= {
        "params": sum(p.numel() for p in model.parameters()),
        "model_mb": model_bytes / 2**20,
        "matrices": len(targets),
        "analysed_matrices": n_analysed,
        "proj_W_tol_max": max((t for t in tol if t is not None), default=None),
        # LoRA-GA's averaged G of every target (fp32, kept off the accelerator until its SVD): host memory on a GPU
        "gradient_store_mb": sum(modules[n].weight.numel() for n in targets) * 4 / 2**20,
        "tables": {k: len(v) for k, v in job.record.analysis.items()},
    }
    return out


def old_tree(rev: str, into: Path) -> Path:
    """`src/` of `rev`, extracted from this repository (git archive), for the old code path."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def old_source(args, tmp: Path) -> Path | None:
    """The old path's `src/`: --old-src, else `git archive` of --old-rev; None with --no-old."""
    if args.no_old:
        return None
    if args.old_src:
        src = Path(args.old_src)
        if not (src / "loralab").is_dir():
            raise SystemExit(f"scale.py: --old-src {src} holds no loralab/ package (give the old commit's src/)")
        return src
    return old_tree(args.old_rev, tmp)


def run_child(args, size: str, path: str, src: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", "--size", size, "--path", path, "--device", args.device]
    cmd += ["--threads", str(args.threads), "--length", str(args.length), "--batch", str(args.batch)]
    cmd += ["--grad-batches", str(args.grad_batches), "--old-layers", str(args.old_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{path} path at {size} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def old_label(args) -> str:
    if args.no_old:
        return "not run (--no-old)"
    return f"`{args.old_src}` (--old-src)" if args.old_src else f"`{args.old_rev}` (git archive)"


def fmt(x, digits=2):
    return "—" if x is None else f"{x:,.{digits}f}"


def goal_lines(new: dict, peak: float, key: str) -> list[str]:
    """The issue's goals, read off the new path: analyses vs one step, peak memory vs the model."""
    stages, model = new["stages"], new["model_mb"]
    step = stages["training step"]
    analyses, probe = stages["analyses"]["wall_s"], stages["probe"]["wall_s"]
    lines = [
        f"- analyses / one training step (new): {analyses / step['wall_s']:.2f}; with the first-step probe: "
        f"{(analyses + probe) / step['wall_s']:.2f} (goal ≤ 2 at ≥ 1B)",
        f"- new peak above the model: {peak / model:.3f} of the model's bytes; above the training step's own peak "
        f"(one step's activations, {step[key] / model:.3f} of the model): {(peak - step[key]) / model:.3f} "
        "(goal ≤ 0.25)",
    ]
    store = new.get("gradient_store_mb")
    if store and key == "rss_mb":
        rest = max(s[key] - (store if name in ("gradient estimate", "init") else 0) for name, s in stages.items())
        lines.append(
            f"- without LoRA-GA's gradient store ({store:,.0f} MiB of fp32 G, host RAM on a GPU machine): peak "
            f"{rest / model:.3f} of the model, {(rest - step[key]) / model:.3f} above the step's own"
        )
    return lines


def new_only(size: str, new: dict, mem: str, key: str) -> list[str]:
    """The new path's table alone (--no-old)."""
    lines = [
        f"## {size}: {new['params'] / 1e9:.3f}B parameters, {new['model_mb']:,.0f} MiB, {new['matrices']} adapted "
        "matrices (new path only: no old code path was given)",
        "",
        f"| stage | new wall s | new {mem} |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {fmt(new['stages'][s]['wall_s'])} | {fmt(new['stages'][s][key], 0)} |" for s in STAGES]
    total = sum(new["stages"][s]["wall_s"] for s in STAGES)
    peak = max(new["stages"][s][key] or 0 for s in STAGES)
    lines += [f"| **whole job** | {fmt(total)} | {fmt(peak, 0)} |", ""]
    return [*lines, *goal_lines(new, peak, key), ""]


def report(args, runs: dict) -> str:
    cuda = args.device == "cuda"
    mem = "peak CUDA MiB above model" if cuda else "peak RSS MiB above model"
    key = "cuda_mb" if cuda else "rss_mb"
    lines = [
        "# Scale benchmark: a whole LoRA-GA job, old vs new code path",
        "",
        f"`python benchmarks/scale.py {' '.join(sys.argv[1:])}` on {platform.machine()}, {args.device}, "
        f"{args.threads} threads; old = {old_label(args)}, new = this checkout. LoRA-GA r=8 "
        f"(grad_batches={args.grad_batches} of 1 x {args.length} tokens), every linear layer of every block, all "
        f"analyses on ({', '.join(ANALYSES)}), two AdamW steps of {args.batch} x {args.length} tokens, fp32.",
        "",
    ]
    for size, (old, new) in runs.items():
        if old is None:
            lines += new_only(size, new, mem, key)
            continue
        lines += [
            f"## {size}: {new['params'] / 1e9:.3f}B parameters, {new['model_mb']:,.0f} MiB, {new['matrices']} adapted "
            "matrices",
            "",
            f"| stage | old wall s | new wall s | new/old | old {mem} | new {mem} |",
            "|---|---|---|---|---|---|",
        ]
        for stage in STAGES:
            o, n = old["stages"][stage], new["stages"][stage]
            ratio = n["wall_s"] / o["wall_s"] if o["wall_s"] > 0 else None
            lines.append(
                f"| {stage} | {fmt(o['wall_s'])} | {fmt(n['wall_s'])} | {fmt(ratio)} | {fmt(o[key], 0)} | "
                f"{fmt(n[key], 0)} |"
            )
        total = {p: sum(r["stages"][s]["wall_s"] for s in STAGES) for p, r in (("old", old), ("new", new))}
        peak = {p: max(r["stages"][s][key] or 0 for s in STAGES) for p, r in (("old", old), ("new", new))}
        lines.append(
            f"| **whole job** | {fmt(total['old'])} | {fmt(total['new'])} | {fmt(total['new'] / total['old'])} | "
            f"{fmt(peak['old'], 0)} | {fmt(peak['new'], 0)} |"
        )
        lines += ["", *goal_lines(new, peak["new"], key)]
        lines += [
            f"- W's top-r energy (Table 7) to relative tolerance ≤ {fmt(new['proj_W_tol_max'], 8)} (block Krylov; "
            "the achieved one per matrix is `proj_W_tol` in the table; random weights have the flat spectrum that "
            "converges slowest)",
        ]
        if old["analysed_matrices"] != old["matrices"]:
            lines.append(
                f"- old analyses timed on {old['analysed_matrices']} of {old['matrices']} matrices and scaled "
                "linearly (per-matrix full SVDs); their memory column is the measured subset's"
            )
        lines.append("")
    if len(runs) > 1:  # growth: the per-matrix work, per adapted weight entry, should not grow with the model
        lines += ["Growth (new path): analyses and probe wall time per 10⁹ adapted weight entries", ""]
        for size, (_, new) in runs.items():
            entries = new["gradient_store_mb"] * 2**20 / 4 / 1e9
            a, p = new["stages"]["analyses"]["wall_s"], new["stages"]["probe"]["wall_s"]
            lines.append(
                f"- {size}: {new['matrices']} matrices, {entries:.3f}·10⁹ entries: analyses {a / entries:.1f} s, "
                f"probe {p / entries:.1f} s per 10⁹ entries"
            )
        lines.append("")
    if not cuda:
        lines += [
            "On a CPU the model's device and the host are the same memory: LoRA-GA's fp32 gradient accumulators",
            "(the official algorithm keeps every layer's averaged G off the accelerator until its SVD) count in the",
            "'gradient estimate' and 'init' rows here; on a GPU they are host RAM, not accelerator memory.",
            "",
        ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.25b,1b", help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per training step")
    parser.add_argument("--grad-batches", type=int, default=2, help="LoRA-GA's gradient micro-batches (of 1)")
    parser.add_argument("--old-layers", type=int, default=7, help="0: time the old analyses on every matrix")
    parser.add_argument("--old-rev", default="b26fadb")
    parser.add_argument("--old-src", help="the old commit's src/, extracted (instead of git archive of --old-rev)")
    parser.add_argument("--no-old", action="store_true", help="run the new code path only")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "scale.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch  # noqa: PLC0415

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes {unknown}: choose from {list(SIZES)}")
    runs = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        old_src = old_source(args, Path(tmp))
        for size in sizes:
            old = None if old_src is None else run_child(args, size, "old", old_src)
            runs[size] = (old, run_child(args, size, "new", ROOT / "src"))
            print(f"[scale] {size} done", file=sys.stderr)
            text = report(args, runs)  # after each size: a run cut short keeps what finished
            out.write_text(text)
            out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    print(text)


if __name__ == "__main__":
    main()
