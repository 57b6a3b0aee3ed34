"""Counterfactual evaluation of attribution scores: LDS and brittleness.

Scores follow the library sign convention: ``scores[q, i] > 0`` means
training on example ``i`` lowers the loss of query ``q`` (helpful).
"""

from .align import align_scores
from .brittleness import BrittlenessResult, brittleness
from .damping_choice import DampingChoice, choose_damping
from .lds import lds, linear_datamodeling_score, make_subsets, spearman
from .results import load_results, save_results

__all__ = [
    "align_scores",
    "BrittlenessResult",
    "brittleness",
    "choose_damping",
    "DampingChoice",
    "lds",
    "linear_datamodeling_score",
    "load_results",
    "make_subsets",
    "save_results",
    "spearman",
]
