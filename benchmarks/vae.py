"""`tokenmill bench vae`: one-layer VAE vs hierarchical VAE at equal wall-clock budget.

Both train on the MNIST-5k train split (4,500 digits, dynamically binarized: every batch is a
fresh Bernoulli draw of the grey levels) with a Bernoulli decoder, for the same number of
seconds each, and are scored on the 500 val digits (one fixed binarization) with the
importance-weighted bound on −log p(x) using their EMA weights.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_BUDGET_S = 120.0
DEFAULT_K = 100


@dataclass
class TrainResult:
    model: Any  # the EMA module, ready for evaluation
    steps: int
    skipped: int
    seconds: float
    last_loss: float


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, nonnegative_int, positive_float, positive_int

    parser = subparsers.add_parser(
        "vae", help="one-layer VAE vs hierarchical VAE on binarized MNIST-5k at equal training time",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--budget-s", type=positive_float, default=DEFAULT_BUDGET_S, help="training seconds per model (default %(default)s)")
    parser.add_argument("--k", type=positive_int, default=DEFAULT_K, help="importance samples for the val bound (default %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default %(default)s: steady timings on a shared machine)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def binarize_fixed(x, seed: int):
    """One fixed Bernoulli draw (the val set must not change between evaluations)."""
    import torch

    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


def train(model, x, optim, budget_s: float | None = None, max_steps: int | None = None,
          batch_size: int = 64, seed: int = 0) -> TrainResult:
    """Train on dynamically binarized `x` until the time budget or the step count runs out."""
    import torch

    from tokenmill.pipeline.training.optim import Part
    from tokenmill.pipeline.training.step import StepRunner, own_loss

    torch.manual_seed(seed)
    part = Part("model", model, model, optim)
    runner = StepRunner({"model": part}, "fp32", torch.device("cpu"))
    start, loss = time.perf_counter(), float("nan")
    while True:
        for index in torch.randperm(x.shape[0]).split(batch_size):
            done_steps = max_steps is not None and part.steps >= max_steps
            if done_steps or (budget_s is not None and time.perf_counter() - start >= budget_s):
                return TrainResult(part.eval_module(), part.steps, part.skipped, time.perf_counter() - start, loss)
            loss = float(runner.run(own_loss, [(torch.bernoulli(x[index]),)], part.steps).losses["model"])


def baseline_vae():
    """The classic one-stochastic-layer VAE (Kingma & Welling): MLP 512-512, 32 latents."""
    from tokenmill.models.vae import GaussianVAE, VAEConfig

    return GaussianVAE(VAEConfig(arch="mlp", hidden=512, latent_dim=32))


def hierarchical_vae():
    """Latent groups at 8x8, 4x4 and 2x2 (the stem folds 4x4 pixel patches into channels), so a
    training step costs only ~2.5x the MLP VAE's on a CPU."""
    from tokenmill.models.hvae import HierarchicalVAE, HVAEConfig

    return HierarchicalVAE(HVAEConfig(width=32, latent_channels=8, resolutions=(8, 4, 2)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tokenmill.models.image_metrics import importance_weighted_nll
    from tokenmill.pipeline.training.optim import OptimConfig

    torch.set_num_threads(args.threads)
    from tokenmill.pipeline.shards.synthetic import mnist_tensors

    x_train, _ = mnist_tensors("train")
    x_val = binarize_fixed(mnist_tensors("val")[0], args.seed)
    result: dict[str, Any] = {"budget_s": args.budget_s, "k": args.k, "threads": args.threads}
    for name, make, lr in (("vae", baseline_vae, 1e-3), ("hvae", hierarchical_vae, 2e-3)):
        torch.manual_seed(args.seed)
        optim = OptimConfig(lr=lr, warmup_steps=100, grad_clip=200.0, skip_grad_norm=2000.0, ema_decay=0.998)
        trained = train(make(), x_train, optim, budget_s=args.budget_s, seed=args.seed)
        torch.manual_seed(args.seed)
        scores = importance_weighted_nll(trained.model, x_val, k=args.k)
        result[name] = {"nll_nats": scores["nll_nats"], "elbo_nats": scores["elbo_nats"],
                        "steps": trained.steps, "skipped": trained.skipped}
    print(f"binarized MNIST-5k val (500 digits), {args.budget_s:g} s training each, IW bound with K={args.k}")
    print(f"{'model':<8}{'steps':>8}{'-ELBO':>10}{'NLL':>10}  (nats, lower is better)")
    for name in ("vae", "hvae"):
        r = result[name]
        print(f"{name:<8}{r['steps']:>8}{r['elbo_nats']:>10.2f}{r['nll_nats']:>10.2f}")
    result["hvae_minus_vae_nll"] = result["hvae"]["nll_nats"] - result["vae"]["nll_nats"]
    print(f"hvae − vae NLL: {result['hvae_minus_vae_nll']:+.2f} nats")
    return result
