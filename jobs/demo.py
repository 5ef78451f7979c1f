"""`tokenmill demo`: train a small conv VAE on built-in MNIST-5k and report its test likelihood.

Interim demo until tokenization lands: single process, CPU friendly. Trains a conv Gaussian VAE
with a Bernoulli decoder on dynamically binarized digits, evaluates the ELBO and the
importance-weighted −log p(x) on the 500 test digits, saves the model and writes a
reconstruction grid and an interpolation grid as PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from jobs.cli import add_json_option

    parser = subparsers.add_parser(
        "demo", help="train a small VAE on built-in MNIST-5k and print its test metrics",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: train for --budget-s seconds)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="training seconds when --steps is not given (default %(default)s)")
    parser.add_argument("--k", type=int, default=50, help="importance samples for the test bound (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default %(default)s: steady timings on a shared machine)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from jobs.benchmarks.vae import binarize_fixed, mnist_tensors, train
    from models import save_model
    from models.evaluation import importance_weighted_nll
    from models.latent_ops import interpolate
    from models.training import OptimConfig
    from models.vae import GaussianVAE, VAEConfig
    from pipeline.images import save_png_grid

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    x_train, _ = mnist_tensors("train")
    x_test = binarize_fixed(mnist_tensors("test")[0], args.seed)
    model = GaussianVAE(VAEConfig(arch="conv", hidden=32, latent_dim=16, likelihood="bernoulli"))
    optim = OptimConfig(lr=2e-3, warmup_steps=50, ema_decay=0.995, skip_grad_norm=2000.0)
    budget = None if args.steps is not None else args.budget_s
    trained = train(model, x_train, optim, budget_s=budget, max_steps=args.steps, seed=args.seed)
    ema = trained.model

    torch.manual_seed(args.seed)
    scores = importance_weighted_nll(ema, x_test, k=args.k)
    model_dir = save_model(ema, args.out / "model", extra={"source": "builtin:mnist5k", "steps": trained.steps})
    with torch.no_grad():
        recon = ema(x_test[:32]).recon  # (32, 1, 32, 32)
        pairs = interpolate(ema, x_test[0:80:10], x_test[5:85:10], steps=10)  # (80, 1, 32, 32)
    # Rows alternate originals and reconstructions.
    recon_png = save_png_grid(torch.stack([x_test[:32], recon], 1).flatten(0, 1)[:64], args.out / "reconstructions.png", nrow=16)
    interp_png = save_png_grid(pairs, args.out / "interpolations.png", nrow=10)

    result = {
        "steps": trained.steps,
        "skipped_updates": trained.skipped,
        "train_seconds": round(trained.seconds, 1),
        "train_loss": trained.last_loss,
        "test_elbo_nats": scores["elbo_nats"],
        "test_nll_nats": scores["nll_nats"],
        "test_bits_per_dim": scores["bits_per_dim"],
        "k": args.k,
        "model_dir": str(model_dir),
        "reconstructions_png": str(recon_png),
        "interpolations_png": str(interp_png),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"trained a conv VAE on MNIST-5k for {trained.steps} steps ({trained.seconds:.0f} s)")
    print(f"test −ELBO {scores['elbo_nats']:.2f} nats, −log p(x) ≤ {scores['nll_nats']:.2f} nats "
          f"(K={args.k}, {scores['bits_per_dim']:.3f} bits/dim)")
    print(f"model: {model_dir}\nimages: {recon_png}, {interp_png}")
    return result
