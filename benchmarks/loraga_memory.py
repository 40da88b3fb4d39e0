"""Memory of LoRA-GA's gradient estimate: loralab's per-layer streaming (`loralab.gradients.estimate_gradients`)
against PEFT's `preprocess_loraga`, on a real architecture (Llama, built from a config with random weights: no
download) adapting every linear layer of every block, the same seeded token batches for both.

    python benchmarks/loraga_memory.py                       # ~0.5B params, 4 micro-batches of 2 x 128 tokens
    python benchmarks/loraga_memory.py --layers 8 --hidden 1024 --out /tmp/small.md

Each method runs in a fresh subprocess (nothing of the other's allocations left). Reported, per method:
- "grads on the model" (exact): the most gradient bytes attached to the model's weights (`.grad`) at any moment,
  read by a post-accumulate-grad hook on every target weight each time a gradient lands. On an accelerator this is
  what the estimate adds to accelerator memory beyond the model and the activations.
- "peak RSS above the model" (approximate): the process's resident memory during the estimate above what it held
  with the model and batches loaded, sampled every 2 ms. On a CPU-only machine the model's device and the host are
  the same memory, so this includes loralab's fp32 accumulators (which on a GPU machine live in host RAM).
- time of the estimate, and the largest difference between the two estimates (they must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, LoraGAConfig, preprocess_loraga
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.gradients import estimate_gradients
from loralab.results import PeakMemory
from loralab.targets import find_targets

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("loralab", "peft")


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=args.length,
    )
    model = LlamaForCausalLM(config).to(args.device)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen).to(args.device)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches, find_targets(model, LINEAR)


def attached_gradient_meter(model, targets):
    """Largest total of `.grad` bytes on the target weights at any gradient arrival (hooks registered before the
    method's own, so they see each gradient before loralab's hook moves it off)."""
    weights = [dict(model.named_modules())[name].weight for name in targets]
    peak = [0]

    def hook(_param):
        peak[0] = max(peak[0], sum(w.grad.nbytes for w in weights if w.grad is not None))

    handles = [w.register_post_accumulate_grad_hook(hook) for w in weights]
    return peak, handles


def measure(method: str, args) -> dict:
    """Run in a fresh subprocess (see main)."""
    torch.set_num_threads(args.threads)
    model, batches, targets = build(args)
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak_grad, handles = attached_gradient_meter(model, targets)
    mem = PeakMemory(interval=0.002)  # on CUDA it also resets and reads the allocator's peak
    cuda_base = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    start = time.perf_counter()
    with mem:
        if method == "loralab":
            grads = estimate_gradients(model, targets, iter(batches), len(batches))
        else:
            config = LoraConfig(r=8, target_modules=targets, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

            def train_step():
                for batch in batches:
                    model(**batch).loss.backward()

            preprocess_loraga(model, config, train_step)
            modules = dict(model.named_modules())
            grads = {name: modules[name]._peft_loraga_grad for name in targets}
    elapsed = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    # the first and the last block's gradients, for the agreement check (all of them would be GBs on disk)
    kept = [n for n in targets if n.startswith(("model.layers.0.", f"model.layers.{args.layers - 1}."))]
    torch.save({k: grads[k].float() for k in kept}, args.grads_out)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "target_params": sum(dict(model.named_modules())[n].weight.numel() for n in targets),
        "largest_target_params": max(dict(model.named_modules())[n].weight.numel() for n in targets),
        "model_rss_mb": baseline / 2**20,
        "peak_rss_above_model_mb": (mem.peak_rss - baseline) / 2**20,
        "peak_grads_on_model_mb": peak_grad[0] / 2**20,
        "peak_cuda_above_model_mb": (torch.cuda.max_memory_allocated() - cuda_base) / 2**20 if cuda_base else 0.0,
        "time_s": elapsed,
    }


def in_subprocess(method: str, grads_out: Path) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method, "--grads-out", str(grads_out)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(label: str, ours: dict, peft: dict, key: str, unit: str) -> str:
    return f"| {label} | {ours[key]:.1f}{unit} | {peft[key]:.1f}{unit} | {ours[key] / max(peft[key], 1e-9):.3f} |"


CPU_CAVEATS = [
    "Caveats: RSS is sampled every 2 ms and includes allocator caching (approximate; the gradient row is",
    "exact). The 2 cores are shared with other processes: times are indicative only. No GPU was available for",
    "this run: the device-memory claim rests on the exact count of gradient bytes attached to the model, not on",
    "a GPU allocator reading.",
]


def report(args, runs: dict, max_diff: float) -> str:
    ours, peft = runs["loralab"], runs["peft"]
    mb = 2**20
    lines = [
        f"# LoRA-GA gradient estimate: memory, loralab streaming vs PEFT `preprocess_loraga` ({args.device.upper()})",
        "",
        f"Written by `{' '.join(['python benchmarks/loraga_memory.py', *sys.argv[1:]])}` (load average before the "
        f"run: {args.load:.2f}).",
        "",
        f"Model: Llama from config, random weights, {ours['params'] / 1e6:.0f}M parameters (fp32, "
        f"{args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}); targets: every "
        f"linear layer of every block ({len(LINEAR) * args.layers} matrices, {ours['target_params'] / 1e6:.0f}M "
        f"parameters = {ours['target_params'] * 4 / mb:.0f} MB of fp32 gradients; the largest one "
        f"{ours['largest_target_params'] * 4 / mb:.1f} MB). Data: {args.batches} micro-batches of {args.batch} x "
        f"{args.length} random tokens, the same for both. Machine: {platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GB RAM, torch {torch.__version__}, "
        f"{args.threads} threads.",
        "",
        "| | loralab (streamed) | PEFT preprocess_loraga | ratio |",
        "|---|---|---|---|",
        row("gradient bytes on the model's weights, peak (exact)", ours, peft, "peak_grads_on_model_mb", " MB"),
        row("process RSS above the loaded model, peak (sampled)", ours, peft, "peak_rss_above_model_mb", " MB"),
        *(
            [row("CUDA allocated above the loaded model, peak", ours, peft, "peak_cuda_above_model_mb", " MB")]
            if args.device == "cuda"
            else []
        ),
        row("loaded model + batches (RSS)", ours, peft, "model_rss_mb", " MB"),
        row("time of the estimate", ours, peft, "time_s", " s"),
        "",
        f"The two estimates agree: max |difference| {max_diff:.2e} (first and last block's {2 * len(LINEAR)} "
        "gradients, compared in full).",
        "",
        "Reading it. PEFT leaves every target weight's `.grad` on the model until the end, so the model's device",
        "holds all target gradients at once; loralab moves each gradient into an fp32 accumulator on the offload",
        "device (the host) the moment autograd has accumulated it, so the model's device holds one layer's gradient",
        "at a time: peak = model + activations + one layer's gradient. On a GPU that difference is accelerator",
        "memory. On this CPU-only machine the offload device *is* the model's device: the accumulators take the same",
        "RAM as PEFT's `.grad` tensors, so the RSS row compares total memory, where the two should be close.",
        "",
        *(CPU_CAVEATS if args.device == "cpu" else ["On CUDA the allocator row is the device-memory reading."]),
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "loraga-memory-cpu.md"))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args)))
        return
    args.load = os.getloadavg()[0]  # other processes on the same cores slow the timings (not the memory)
    tmp = Path(args.out).with_suffix(".grads")
    tmp.mkdir(parents=True, exist_ok=True)
    runs = {method: in_subprocess(method, tmp / f"{method}.pt") for method in METHODS}
    ours, theirs = (torch.load(tmp / f"{m}.pt") for m in METHODS)
    max_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    for method in METHODS:
        (tmp / f"{method}.pt").unlink()
    tmp.rmdir()
    text = report(args, runs, max_diff)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
