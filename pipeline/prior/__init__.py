"""Transformer priors over a token store: the config of `tokenmill train-prior` (`config`), what
each rank reads (`data`), validation scores and sample grids (`validation`), the lineage that ties
a prior to its store and tokenizer (`lineage`), and sampling back to images (`sampling`). The model
is `models.prior`; the training engine trains it as its prior task (`pipeline.training.tasks.prior`).
"""
