"""The training engine: one driver and one per-rank loop for every model family.

    driver.py     checks, MLflow run, Ray Train's TorchTrainer, export, registration (`train`, `train_prior`)
    loop.py       the per-rank loop: epochs, steps, cadences, resume, checkpoints, rank-0 MLflow
    step.py       one optimizer step: micro-batches, autocast around the forward, backward, updates
    optim.py      a trained Part: AdamW, LR schedule, clipping, skip-on-NaN, EMA weights
    precision.py  autocast dtype (bf16 on CUDA by default), TF32
    context.py    RankContext: Ray Train's, or in-process (unit tests run the loop without Ray)
    state.py      counters, early stopping, checkpoint files and every rank's RNG
    task.py       what a model family supplies; tasks/ holds the families
    config.py     the shared config sections and `tokenmill train`'s config
    reporting.py, progress.py, cluster_check.py   rank-0 MLflow, the driver's progress bar, storage checks
"""
