"""Transformer priors over a token store: training data (`data`), the Ray Train job (`trainer`),
the lineage that ties a prior to its store and tokenizer (`lineage`), and sampling back to
images (`sampling`). The model itself is `models.prior`.
"""
