"""`tokenmill bench vq`: our VectorQuantizer vs vector_quantize_pytorch.VectorQuantize.

Both quantizers sit in the same VQ-VAE encoder/decoder (identical initial weights), with the
same codebook (K=512, dim 64), EMA decay, k-means init, dead-code threshold, commitment weight,
optimiser, batches and seed, trained on the MNIST-5k train split. Steps alternate between the
two models (and which goes first), so CPU contention hits both alike; the first steps are warm-up
and not timed. Validation runs on the 500 val digits: codebook usage over the whole split
(`CodebookStats`) and PSNR of the reconstructions.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

from pipeline.shards.synthetic import mnist_tensors

CODEBOOK_SIZE = 512
LATENT_DIM = 64
DECAY = 0.99
DEAD_CODE_THRESHOLD = 2.0


def register(subparsers: argparse._SubParsersAction) -> None:
    from jobs.cli import add_json_option, nonnegative_int, positive_float, positive_int

    parser = subparsers.add_parser(
        "vq", help="our VectorQuantizer vs vector-quantize-pytorch inside the same VQ-VAE on MNIST-5k",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps per model (default %(default)s)")
    parser.add_argument("--warmup", type=nonnegative_int, default=20, help="untimed first steps (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-images", type=positive_int, default=500, help="val digits to validate on (default: all %(default)s)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def _models(seed: int):
    """(ours, peer): the same VQ-VAE weights, differing only in the quantizer module."""
    import torch
    from torch import nn
    from vector_quantize_pytorch import VectorQuantize

    from models.quantizers import QuantizerConfig, QuantizerOutput
    from models.vqvae import VQVAE, VQVAEConfig

    class PeerQuantizer(nn.Module):
        """Adapts VectorQuantize to our quantizer interface: (B, h, w, D) -> QuantizerOutput."""

        def __init__(self) -> None:
            super().__init__()
            self.codebook_size = CODEBOOK_SIZE
            self.vq = VectorQuantize(
                dim=LATENT_DIM, codebook_size=CODEBOOK_SIZE, decay=DECAY, commitment_weight=0.25,
                kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=DEAD_CODE_THRESHOLD,
            )

        def forward(self, z):
            b, h, w, d = z.shape
            codes, indices, loss = self.vq(z.reshape(b, h * w, d))
            return QuantizerOutput(codes.reshape(z.shape), indices.reshape(b, h, w), loss.sum())

    torch.manual_seed(seed)
    config = VQVAEConfig(
        in_channels=1, image_size=32, hidden=32, res_blocks=1, downsample=4, latent_dim=LATENT_DIM,
        quantizer=QuantizerConfig(codebook_size=CODEBOOK_SIZE, decay=DECAY, kmeans_init=True,
                                  dead_code_threshold=DEAD_CODE_THRESHOLD, seed=seed),
    )
    ours = VQVAE(config)
    peer = copy.deepcopy(ours)
    peer.quantizer = PeerQuantizer()
    return ours, peer


def _validate(model, x) -> dict[str, float]:
    """Codebook usage over the whole split and PSNR of its reconstructions."""
    import torch

    from models.codebook_stats import CodebookStats
    from models.evaluation import psnr

    stats, squared_error = CodebookStats(CODEBOOK_SIZE), 0.0
    model.eval()
    with torch.no_grad():
        for batch in x.split(100):
            out = model(batch)
            stats.update(out.indices)
            squared_error += float((out.recon - batch).pow(2).sum())
    mse = squared_error / x.numel()
    return {"val_usage": stats.usage, "val_perplexity": stats.perplexity, "val_psnr": psnr(torch.tensor(mse)).item()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    x_train, x_val = mnist_tensors("train")[0], mnist_tensors("val")[0][: args.val_images]
    models = dict(zip(("ours", "peer"), _models(args.seed)))
    optims = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    generator = torch.Generator().manual_seed(args.seed)
    order = list(models)
    for step in range(args.steps):
        batch = x_train[torch.randint(x_train.shape[0], (args.batch_size,), generator=generator)]
        for name in order:  # both models see the same batch
            model, optim = models[name], optims[name]
            model.train()
            start = time.perf_counter()
            loss = model(batch).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
        order.reverse()  # neither model always runs second (warmer caches, other load)
    result: dict[str, Any] = {"steps": args.steps, "batch_size": args.batch_size, "codebook_size": CODEBOOK_SIZE,
                              "val_images": x_val.shape[0]}
    for name, model in models.items():
        # Median: robust to the other processes sharing the CPU.
        result[name] = {"step_ms": 1000 * statistics.median(times[name]), **_validate(model, x_val)}
    result["step_time_ratio"] = result["ours"]["step_ms"] / result["peer"]["step_ms"]
    print(f"VQ-VAE on MNIST-5k, K={CODEBOOK_SIZE}, dim {LATENT_DIM}, {args.steps} steps of {args.batch_size}, "
          f"validated on {x_val.shape[0]} val digits")
    print(f"{'quantizer':<10}{'step ms':>10}{'val usage':>12}{'val PSNR':>10}")
    for name in ("ours", "peer"):
        r = result[name]
        print(f"{name:<10}{r['step_ms']:>10.2f}{r['val_usage']:>12.3f}{r['val_psnr']:>10.2f}")
    print(f"step time ratio ours/peer: {result['step_time_ratio']:.3f}")
    return result
