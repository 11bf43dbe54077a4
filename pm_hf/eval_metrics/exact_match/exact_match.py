"""Normalised exact match, an `evaluate` metric module shipped inside pm_hf so that it loads offline.

Load it with ``evaluate.load(<path of this folder>)`` (``pm_hf.data.instruct.metric_path("exact_match")``). One import
per line: evaluate's import scanner misreads ``import a, b``.

Normalisation (both prediction and reference), in this order:
1. lowercase (``ignore_case``);
2. every character of ``string.punctuation`` is removed (``ignore_punctuation``);
3. runs of whitespace become one space and the ends are stripped (always).
The score is the fraction of pairs whose normalised strings are equal (0.0 .. 1.0).
"""

import re
import string

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after lowercasing, removing ASCII punctuation and "
_DESCRIPTION += "collapsing whitespace."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str.
    references: list of str (one per prediction).
    ignore_case: lowercase both sides first (default True).
    ignore_punctuation: remove the characters of `string.punctuation` (default True).
Returns:
    {"exact_match": float in [0, 1]}
Example:
    >>> metric.compute(predictions=["The cat."], references=["the  cat"])
    {'exact_match': 1.0}
"""
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> str:
    text = text.lower() if ignore_case else text
    text = text.translate(_PUNCTUATION) if ignore_punctuation else text
    return re.sub(r"\s+", " ", text).strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=True, ignore_punctuation=True):
        if not predictions:
            return {"exact_match": 0.0}
        hits = [
            normalize(p, ignore_case, ignore_punctuation) == normalize(r, ignore_case, ignore_punctuation)
            for p, r in zip(predictions, references)
        ]
        return {"exact_match": float(sum(hits) / len(hits))}
