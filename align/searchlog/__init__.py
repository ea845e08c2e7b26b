"""Fine-tuning and evaluation on a shop's search log: graded relevance, splits, metrics.

A search log says which products a query led to and how strongly (viewed, carted, bought); the
modules of this package turn it into graded (query, item, grade) judgements, split queries and
products into in-domain and held-out sets, fine-tune on them and judge the result with graded
ranking metrics (``metrics``: nDCG, ERR, RBP, MRR, Recall).
"""
