"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1) from the
execution results of n samples per problem.

The hub's `code_eval` module runs the programs itself; here execution happens in loralab's sandbox
(`loralab.evals.sandbox`) and this module only scores the outcomes, so it is safe to load anywhere. Per problem
pass@k = 1 − C(n−c, k) / C(n, k), computed as the product form 1 − Π_{i=n−c+1..n} (1 − k/i) for numerical
stability; the result is the mean over problems. A problem with fewer than k samples has no pass@k: an error.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Unbiased pass@k estimator over problems, from per-sample pass/fail outcomes."
_INPUTS = """
Args:
    predictions: for each problem, the list of its samples' outcomes (True = the sample passed its tests).
    k: the k values (default [1]).
Returns: {"pass@1": float, ...}, each the mean over problems.
"""


def problem_pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("bool"))}),
        )

    def _compute(self, predictions, k=(1,)):
        counts = [(len(outcomes), int(sum(outcomes))) for outcomes in predictions]
        for kk in k:
            short = [i for i, (n, _) in enumerate(counts) if n < kk]
            if short:
                raise ValueError(f"pass@{kk} needs at least {kk} samples per problem; problems {short[:5]} have fewer")
        return {f"pass@{kk}": float(np.mean([problem_pass_at_k(n, c, kk) for n, c in counts])) for kk in k}
