"""GSM8K exact match, both ways the field reports it: LoRA-GA's strict rule (the headline) and
lm-evaluation-harness's flexible-extract (`loralab.evals.gsm8k` holds the two extraction rules and their sources).

The hub has no GSM8K module; lm-evaluation-harness scores with `exact_match` after its own regex filters, which is
the `flexible_extract` number here.
"""

import datasets
import evaluate

from loralab.evals.gsm8k import gsm8k_scores

_DESCRIPTION = "GSM8K accuracy: strict_match (LoRA-GA's `#### <digits>` rule) and flexible_extract (lm-eval's)."
_INPUTS = """
Args:
    predictions: the model's completions (strings).
    references: GSM8K `answer` fields (the worked solution ending in "#### <number>").
Returns: {"strict_match": float, "flexible_extract": float, "n_no_answer": int}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Gsm8k(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = gsm8k_scores(predictions, references)
        return {key: scores[key] for key in ("strict_match", "flexible_extract", "n_no_answer")}
