"""GLUE's official metrics (the hub's `glue` evaluate module), computed with scikit-learn and scipy.

Same configurations and output names as the hub module: cola → matthews_correlation; mrpc, qqp → accuracy and
binary F1 of class 1; stsb → pearson and spearmanr; every other task → accuracy. STS-B scores are float64 here
(the hub module declares float32, which rounds the inputs before the correlation).
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

CONFIGS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli"]

_DESCRIPTION = "GLUE benchmark metrics: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation."
_INPUTS = """
Args:
    predictions: predicted labels (integers; real-valued scores for stsb).
    references: gold labels (integers; real-valued scores for stsb).
Returns: a dict of floats, e.g. {"accuracy": 0.9, "f1": 0.92} for mrpc.
"""
_CITATION = """@inproceedings{wang2019glue, title={GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
Language Understanding}, author={Wang, Alex and others}, booktitle={ICLR}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise KeyError(f"unknown GLUE configuration {self.config_name!r}; known: {CONFIGS}")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references):
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        out = {"accuracy": float(accuracy_score(references, predictions))}
        if self.config_name in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(references, predictions, pos_label=1, average="binary"))
        return out
