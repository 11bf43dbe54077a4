"""ROUGE-L F-measure through `rouge_score`, an `evaluate` metric module shipped inside pm_hf so that it loads offline.

Load it with ``evaluate.load(<path of this folder>)`` (``pm_hf.data.instruct.metric_path("rouge")``). One import per
line:
evaluate's import scanner misreads ``import a, b``.

For every pair, ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=...)`` scores the prediction against
the reference (its default tokenizer lowercases and keeps runs of [a-z0-9]; ``use_stemmer`` applies the Porter
stemmer). ROUGE-L is the LCS-based F-measure: with LCS length l, prediction length m and reference length n,
P = l/m, R = l/n and F = 2PR/(P+R) (0 when l = 0). The score is the mean F over the pairs (0.0 .. 1.0).
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F-measure (longest common subsequence) of predictions against references."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str.
    references: list of str (one per prediction).
    use_stemmer: Porter-stem the tokens first (default True).
Returns:
    {"rougeL": float in [0, 1]}
Example:
    >>> metric.compute(predictions=["a b c d"], references=["a c d e f"])
    {'rougeL': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, use_stemmer=True):
        if not predictions:
            return {"rougeL": 0.0}
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rougeL": float(sum(scores) / len(scores))}
