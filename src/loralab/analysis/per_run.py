"""The analyses a job runs on its own update, as one configured list (`analyses: [spectrum, amplification, ...]`).

Each is a small registered unit that says when it works — before the variant prepares the model, right after, or on
each adapted matrix's ΔW at the end, one matrix at a time (`loralab.analysis.updates.MatrixUpdate`: factors where ΔW
is low-rank, formed and dropped where it is not; never every ΔW at once) — and what it produces: a table (rows into
the record and W&B), tensors (saved beside the result for the cross-run analyses), a figure. The runner calls the
list in order at each point; adding one is a class here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from loralab.analysis.amplification import amplification_of_update
from loralab.analysis.first_step import FirstStepProbe
from loralab.analysis.spectrum import spectrum_of_update
from loralab.analysis.subspace import left_basis, right_basis
from loralab.analysis.updates import MatrixUpdate

log = logging.getLogger(__name__)
MAX_BASIS = 64  # directions of ΔW kept for φ grids (the LoRA paper's largest rank)


class PerRunAnalysis:
    name: ClassVar[str]
    on_update: ClassVar[bool] = True  # looks at ΔW (`add`): can also run at `analysis_steps` during training

    def __init__(self, rank: int, targets: list[str]):
        self.rank, self.targets = rank, targets

    def before_prepare(self, model: torch.nn.Module, batch: dict) -> None:
        """The pretrained model, before the variant touches it; `batch` is the run's first training batch."""

    def after_prepare(self, model: torch.nn.Module, variant) -> None:
        """The prepared model (adapters in place, no-op at init), before the first optimizer step."""

    def add(self, update: MatrixUpdate, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """One adapted matrix's ΔW = W_final − W0 (and the variant's (A, B) factors of it, if it has them); the
        update is dropped after every analysis has seen it."""

    def rows(self) -> list[dict]:
        """Table rows, once every matrix has been added."""
        return []

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save beside the result ("<matrix>|<kind>" keys), for analyses across runs."""
        return {}

    def figure(self, rows: list[dict], path: Path, title: str) -> Path | None:
        """A PNG of this run's table, for W&B; None when the analysis has no figure."""
        return None


class Spectrum(PerRunAnalysis):
    """Singular values of ΔW, stable rank, 90%-energy rank, numerical rank (`analysis.spectrum`)."""

    name = "spectrum"

    def keep(self) -> int:
        # at least 3r values: LoRA-GA's ΔW has rank <= 2r, and its drop after 2r must be visible
        return max(3 * self.rank, 16)

    def __init__(self, rank, targets):
        super().__init__(rank, targets)
        self.table = []

    def add(self, update, factors):
        row = {"name": update.name, "shape": tuple(update.shape), **spectrum_of_update(update)}
        row["singular_values"] = row.pop("singular_values")[: self.keep()]
        self.table.append(row)

    def rows(self):
        return self.table

    def figure(self, rows, path, title):
        from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: no global backend is chosen here)

        spec = pd.DataFrame(rows)
        grid = np.array([np.array(s) / s[0] if s and s[0] > 0 else np.zeros(len(s)) for s in spec.singular_values])
        fig = Figure(figsize=(7, 0.25 * len(spec) + 1.5), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto")
        ax.set(yticks=range(len(spec)), yticklabels=spec.name, xlabel="singular value index i", title=title)
        ax.tick_params(axis="y", labelsize=6)
        fig.colorbar(im, ax=ax, label="σ_i / σ_1")
        fig.savefig(path, dpi=100)
        return Path(path)


class Amplification(PerRunAnalysis):
    """LoRA Table 7: W projected on ΔW's top-r subspace, beside W's own and a random one (`analysis.amplification`)."""

    name = "amplification"

    def __init__(self, rank, targets, seed: int = 0):
        super().__init__(rank, targets)
        self.generator = torch.Generator().manual_seed(seed)  # the random baselines, in matrix order
        self.table = []

    def add(self, update, factors):
        # W0 is recomputed from the model (frozen weight, + s·B0·A0 where the init moved it out): no copy is kept
        self.table.append({"name": update.name, **amplification_of_update(update, self.rank, self.generator)})

    def rows(self):
        return self.table


class SubspaceBases(PerRunAnalysis):
    """The singular bases the cross-run φ grids compare (`python -m loralab.analyze`): A's right, B's left and ΔW's
    left / right singular vectors, saved beside the result."""

    name = "subspace_bases"

    def __init__(self, rank, targets):
        super().__init__(rank, targets)
        self.bases = {}

    def add(self, update, factors):
        name = update.name
        k = min(max(self.rank, 1), MAX_BASIS, *update.matrix_shape)
        U, _, Vh = update.svd()  # shared with the other analyses of this matrix (exact from factors if low-rank)
        self.bases[f"{name}|dW_left"] = U[:, :k].float().cpu().contiguous()
        self.bases[f"{name}|dW_right"] = Vh[:k].transpose(0, 1).float().cpu().contiguous()
        if factors is not None:
            A, B = factors
            self.bases[f"{name}|A_right"], self.bases[f"{name}|B_left"] = right_basis(A), left_basis(B)

    def tensors(self):
        return {k: v.float().contiguous() for k, v in self.bases.items()}


class FirstStep(PerRunAnalysis):
    """The variant's first plain-SGD step vs full fine-tuning's on the same batch (`analysis.first_step`)."""

    name = "first_step"
    on_update = False  # the init only

    def before_prepare(self, model, batch):
        log.info("first-step probe: full fine-tuning's gradient on %d target matrices", len(self.targets))
        self.probe = FirstStepProbe(self.targets, batch)
        self.probe.before_prepare(model)

    def after_prepare(self, model, variant):
        start = time.perf_counter()
        log.info("first-step probe: %s's first step against it", variant.name)
        self.table = self.probe.after_prepare(model, variant)
        log.info("first-step probe: done in %.1f s", time.perf_counter() - start)
        del self.probe

    def rows(self):
        return self.table


ANALYSES: dict[str, type[PerRunAnalysis]] = {c.name: c for c in (Spectrum, Amplification, SubspaceBases, FirstStep)}


def make_analyses(names: list[str], rank: int, targets: list[str]) -> list[PerRunAnalysis]:
    return [ANALYSES[n](rank, targets) for n in names]
