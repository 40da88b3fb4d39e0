"""Accuracy and macro-F1 for single-label classification (the tweet and VTAB tasks' metrics).

macro_f1 is the unweighted mean of the per-class F1 over every label seen in either the predictions or the
references (scikit-learn's `average="macro"`; a class never predicted and never present does not count).
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score

_DESCRIPTION = "Accuracy and macro-averaged F1 of integer class predictions."
_INPUTS = """
Args:
    predictions: predicted class ids (integers).
    references: gold class ids (integers).
Returns: {"accuracy": float, "macro_f1": float}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
        }
