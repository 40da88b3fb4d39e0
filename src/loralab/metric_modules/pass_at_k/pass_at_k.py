"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1) from the
execution results of n samples per problem.

The hub's `code_eval` module runs the programs itself; here execution happens in loralab's sandbox
(`loralab.evals.sandbox`) and this module only scores the outcomes, so it is safe to load anywhere. Per problem
pass@k = 1 − C(n−c, k) / C(n, k) (`loralab.evals.humaneval.pass_at_k`, the product form); the result is the mean
over problems. A problem with fewer than k samples has no pass@k: an error.
"""

import datasets
import evaluate

from loralab.evals.humaneval import pass_at_k

_DESCRIPTION = "Unbiased pass@k estimator over problems, from per-sample pass/fail outcomes."
_INPUTS = """
Args:
    predictions: for each problem, the list of its samples' outcomes (True = the sample passed its tests).
    k: the k values (default [1]).
Returns: {"pass@1": float, ...}, each the mean over problems.
"""


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
        return {f"pass@{kk}": sum(pass_at_k(n, c, kk) for n, c in counts) / len(counts) for kk in k}
