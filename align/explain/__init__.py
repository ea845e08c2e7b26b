"""Why this recommendation? Explanations of the recommender head's and the search's results.

For each result: which history items contributed how much (history.py: leave-one-out, or
gradient x input for long histories), which modalities of the item carried the score
(modalities.py: an exact split), and the catalogue words that best describe the match
(words.py: zero-shot probes against the catalogue's own vocabulary). report.py puts them
together per result (JSON-ready, and text); align/rec/faithfulness.py checks that they are true.
"""
from align.explain.report import (RecommendationExplainer, SearchExplainer, checkpoint_of, format_explanation,
                                  recommender_probe, search_explainer)

__all__ = ["RecommendationExplainer", "SearchExplainer", "checkpoint_of", "format_explanation", "recommender_probe",
           "search_explainer"]
