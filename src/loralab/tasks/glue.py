"""GLUE (nyu-mll/glue): sequence classification (RoBERTa, DeBERTaV3) or text-to-text with label words (T5).

Splits: "test" is the task's labelled dev set (`task.test_split`; GLUE's test labels are hidden, and the
papers report dev); "val" is a seeded slice of `n_val` training examples (0: none), for curves only — no model
selection, the final model is the one evaluated. Metrics are GLUE's official ones (`loralab.evals.metrics`).

Text-to-text follows the official LoRA-GA code: input "<instruction><text>[\\n<text2>]\\nresult: ", target the
label word; training targets padded to the batch's longest are trained on at the pad positions too, with the target
mask as decoder_attention_mask (`target_padding: train`, their SeqToSeqEncode; `ignore`: -100). Its metric restricts
the output to the label words and compares the logits of their *first tokens* at the first decoder step
(`label_scoring: first_token`, the "soft" accuracy of LoRA-GA's compute_metrics, generalised from two labels to any
number by an argmax: theirs compares the true word with token id sum(label ids) - true id, which is the other word
only for two labels); `sequence` scores each word's whole token sequence instead (teacher-forced log-likelihood), for
label words that share a first token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from loralab.config import ConfigError, TaskConfig
from loralab.evals.metrics import classification_metrics, glue_metrics, primary_metric
from loralab.tasks.base import EvalContext, TaskData, by_length, classification_evaluator, fingerprint, holdout_indices
from loralab.tasks.hub import load_split, require_columns


def glue_rows(cfg: TaskConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """train / val / test rows (dicts with the text fields and "label") after the fixed, seeded split."""
    if not cfg.text_fields:
        raise ConfigError(f"task {cfg.name!r}: task.text_fields is empty (e.g. [premise, hypothesis])")
    train_ds = load_split(cfg.dataset, cfg.subset, cfg.train_split, cfg.data_dir, task=cfg.name)
    test_ds = load_split(cfg.dataset, cfg.subset, cfg.test_split, cfg.data_dir, task=cfg.name)
    for ds, split in ((train_ds, cfg.train_split), (test_ds, cfg.test_split)):
        require_columns(ds, [*cfg.text_fields, "label"], f"task {cfg.name!r} split {split!r}")
    columns = [*cfg.text_fields, "label"]
    train_rows = train_ds.select_columns(columns).to_list()
    test_rows = test_ds.select_columns(columns).to_list()
    if len(cfg.labels) > 1:  # classification: class indices into cfg.labels (-1 marks GLUE's hidden test labels)
        bad = sorted({r["label"] for r in train_rows + test_rows if not 0 <= r["label"] < len(cfg.labels)})
        if bad:
            raise ConfigError(f"task {cfg.name!r}: label ids {bad[:5]} outside 0..{len(cfg.labels) - 1}")
    keep, val = holdout_indices(len(train_rows), cfg.n_val, cfg.split_seed) if cfg.n_val else (None, [])
    if keep is not None:
        train_rows, val_rows = [train_rows[i] for i in keep], [train_rows[i] for i in val]
    else:
        val_rows = []
    if cfg.n_train is not None:  # a seeded subset, not the first rows (GLUE files are not shuffled by class)
        order = np.random.default_rng(cfg.split_seed).permutation(len(train_rows))[: cfg.n_train]
        train_rows = [train_rows[i] for i in np.sort(order)]
    if cfg.test_limit is not None:
        test_rows = test_rows[: cfg.test_limit]
    return train_rows, val_rows, test_rows


def glue_metric_fn(cfg: TaskConfig):
    """GLUE's official metrics for the task, plus accuracy / macro-F1 on every classification task (LoRA-GA reports
    accuracy on CoLA too)."""

    def metrics(predictions, references):
        out = glue_metrics(cfg.subset, predictions, references)
        return out if len(cfg.labels) == 1 else classification_metrics(predictions, references) | out

    return metrics


def load_glue(cfg: TaskConfig, tokenizer) -> TaskData:
    rows = glue_rows(cfg)
    digest = fingerprint(*[[tuple(r.values()) for r in split] for split in rows])
    if cfg.kind == "text2text":
        return text2text_task(cfg, tokenizer, rows, digest)
    regression = len(cfg.labels) == 1  # STS-B: one "label", the similarity score: a one-output regression head

    def encode(split_rows):
        texts = [[r[f] for r in split_rows] for f in cfg.text_fields]
        enc = tokenizer(*texts, truncation=True, max_length=cfg.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": float(r["label"]) if regression else int(r["label"])}
            for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], split_rows)
        ]

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    train, val, test = rows
    return TaskData(
        train=encode(train),
        val=by_length(encode(val)) if val else [],
        test=by_length(encode(test)),
        collate=collate,
        num_labels=len(cfg.labels),
        fingerprint=digest,
        evaluate=classification_evaluator(collate, glue_metric_fn(cfg)),
        metric=primary_metric(cfg.subset),
    )


# --- text-to-text (T5) -------------------------------------------------------------------------------------


def t5_input(cfg: TaskConfig, row: dict) -> str:
    template = cfg.prompt or "{text}\nresult: "
    return template.format(text="\n".join(str(row[f]) for f in cfg.text_fields), **row)


def label_word_ids(cfg: TaskConfig, tokenizer) -> list[list[int]]:
    # the word's tokens + the end-of-sequence token, as T5's tokenizer encodes a target (tiny test models share a
    # WordPiece tokenizer whose special tokens would otherwise put [CLS] first in every word)
    ids = [
        tokenizer(word, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for word in cfg.label_words
    ]
    if cfg.label_scoring == "first_token":
        firsts = [seq[0] for seq in ids]
        if len(set(firsts)) < len(firsts):
            raise ConfigError(
                f"task {cfg.name!r}: label words {list(cfg.label_words)} share a first token ({firsts}); "
                "first_token scoring cannot tell them apart: set task.label_scoring=sequence"
            )
    return ids


def text2text_task(cfg: TaskConfig, tokenizer, rows, digest: str) -> TaskData:
    words = label_word_ids(cfg, tokenizer)

    def encode(split_rows):
        enc = tokenizer([t5_input(cfg, r) for r in split_rows], truncation=True, max_length=cfg.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": words[r["label"]], "class_id": r["label"]}
            for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], split_rows)
        ]

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    train_collate = target_collate(cfg, collate, tokenizer.pad_token_id)
    train, val, test = rows
    return TaskData(
        train=encode(train),
        val=by_length(encode(val)) if val else [],
        test=by_length(encode(test)),
        collate=train_collate,
        num_labels=len(cfg.labels),
        fingerprint=digest,
        evaluate=label_word_evaluator(cfg, collate, words),
        metric=primary_metric(cfg.subset, convention="loraga"),  # the paper's T5 table: accuracy everywhere
    )


def target_collate(cfg: TaskConfig, collate, pad_id: int):
    """Training batches. target_padding=train (official): the targets are padded with the pad token and trained on
    there too, the target mask passed as decoder_attention_mask, as LoRA-GA's SeqToSeqEncode does; ignore: -100."""

    def train_collate(batch: list[dict]) -> dict:
        out = collate([{k: v for k, v in e.items() if k != "class_id"} for e in batch])
        if cfg.target_padding == "train":
            real = out["labels"] != -100
            out["labels"] = out["labels"].masked_fill(~real, pad_id)
            out["decoder_attention_mask"] = real.long()
        return out

    return train_collate


def label_word_evaluator(cfg: TaskConfig, collate, words: list[list[int]]):
    """Predict the label whose word scores highest (see the module docstring); also the mean target loss."""
    metrics = glue_metric_fn(cfg)

    @torch.no_grad()
    def evaluate(model, examples: list, ctx: EvalContext) -> dict[str, float]:
        acc = ctx.accelerator
        strip = lambda batch: (
            collate([{k: v for k, v in e.items() if k != "class_id"} for e in batch])
            | {"class_id": torch.tensor([e["class_id"] for e in batch])}
        )
        loader = acc.prepare_data_loader(DataLoader(examples, batch_size=ctx.batch_size, collate_fn=strip))
        model.eval()
        preds, refs, loss_sum, n = [], [], 0.0, 0
        for batch in tqdm(loader, desc=ctx.split, leave=False, disable=not (ctx.progress and acc.is_main_process)):
            class_id = batch.pop("class_id")
            out = model(**batch)
            if cfg.label_scoring == "first_token":
                firsts = torch.tensor([w[0] for w in words], device=out.logits.device)
                scores = out.logits[:, 0, :].float()[:, firsts]
            else:
                scores = sequence_scores(model, batch, words)
            pred, y, loss = acc.gather_for_metrics((scores.argmax(-1), class_id, example_loss(out.logits, batch)))
            preds.append(pred.cpu().numpy())
            refs.append(y.cpu().numpy())
            loss_sum += float(loss.sum())
            n += len(y)
        model.train()
        return metrics(np.concatenate(preds), np.concatenate(refs)) | {"loss": loss_sum / n}

    return evaluate


def example_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-example mean cross-entropy over the target tokens (padding is -100)."""
    labels = batch["labels"]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sequence_scores(model, batch: dict, words: list[list[int]]) -> torch.Tensor:
    """Sum of token log-probabilities of each label word's full sequence (teacher forcing), batch × labels."""
    scores = []
    for word in words:
        target = torch.tensor(word, device=batch["input_ids"].device).repeat(len(batch["input_ids"]), 1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=target).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        scores.append(logp.sum(-1))
    return torch.stack(scores, -1)
