"""`tokenmill bench vqgan`: what the adversarial (and perceptual) loss buys a VQGAN on natural images.

One VQGAN (identical initial weights, quantizer, optimiser, batches and seed) is trained twice on
64 px patches of scikit-learn's two bundled photos (`load_sample_images`: china, flower; nothing is
downloaded): (a) reconstruction loss (L1) alone, (b) L1 + PatchGAN hinge loss with taming's adaptive
weight from `--disc-start` on (+ LPIPS when its weights are present locally; the result says
whether they were). Training crops come from the left 75% of each photo (random position and flip
per step), validation crops from a fixed grid over the right 25%. Reported per run over the val
crops: PSNR, SSIM and hf_ratio (high-frequency spectral power of reconstructions / originals;
1.0 = as sharp as the data, blur is below 1) via `models.image_metrics.ReconstructionMetrics`.
Target: (b) moves hf_ratio toward 1 by >= 0.1 at a PSNR cost <= 1 dB.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

VAL_STRIDE = 32  # val crops overlap by half at 64 px: 96 crops


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, nonnegative_int, positive_float, positive_int

    parser = subparsers.add_parser(
        "vqgan", help="VQGAN on natural-image patches: recon loss alone vs + adversarial (+ perceptual)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per run (default %(default)s)")
    parser.add_argument("--disc-start", type=nonnegative_int, default=None, help="discriminator start step (default: steps / 3)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--size", type=positive_int, default=64, help="patch size in px (default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=5e-4)
    parser.add_argument("--adversarial-weight", type=positive_float, default=0.6)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default %(default)s: on a shared CPU more threads spin and run slower)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on small patches: checks it runs (< 1 min)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def _patches(size: int):
    """(train photos as (2, 3, H, W_train) float, val crops (N, 3, size, size)) in [0, 1]."""
    import numpy as np
    import torch
    from sklearn.datasets import load_sample_images

    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255  # (2, 3, 427, 640)
    split = int(photos.shape[-1] * 0.75)
    train, val = photos[..., :split], photos[..., split:]
    crops = [val[i, :, top:top + size, left:left + size] for i in range(val.shape[0])
             for top in range(0, val.shape[-2] - size + 1, VAL_STRIDE)
             for left in range(0, val.shape[-1] - size + 1, VAL_STRIDE)]
    return train, torch.stack(crops)


def _random_crops(photos, size: int, batch: int, generator):
    """(batch, 3, size, size) random crops (and horizontal flips) of the training photos."""
    import torch

    out = []
    for _ in range(batch):
        i = int(torch.randint(photos.shape[0], (1,), generator=generator))
        top = int(torch.randint(photos.shape[-2] - size + 1, (1,), generator=generator))
        left = int(torch.randint(photos.shape[-1] - size + 1, (1,), generator=generator))
        crop = photos[i, :, top:top + size, left:left + size]
        out.append(crop.flip(-1) if int(torch.randint(2, (1,), generator=generator)) else crop)
    return torch.stack(out)


def _model(size: int, seed: int):
    import torch

    from tokenmill.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(image_size=size, base_channels=16, channel_mult=(1, 2, 2), res_blocks=1, latent_dim=16,
                             quantizer={"kind": "vq", "codebook_size": 512, "codebook_dim": 8, "cosine": True,
                                        "kmeans_init": False, "seed": seed}))


def _train(model, loss, train, val, args, disc_start: int) -> dict[str, Any]:
    import torch

    from tokenmill.models.image_metrics import ReconstructionMetrics

    runner, losses = _engine_step(model, loss, args)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for both runs
    start = time.perf_counter()
    for step in range(args.steps):
        crops = _random_crops(train, args.size, args.batch_size, generator)  # (B, 3, size, size) in [0, 1]
        # As the image stream gives them: uint8 (B, H, W, C) (the photos are uint8, so this is exact).
        batch = {"image": (crops * 255).round().to(torch.uint8).permute(0, 2, 3, 1),
                 "label": torch.zeros(len(crops), dtype=torch.int64)}
        runner.run(losses, [batch], step)
    seconds = time.perf_counter() - start
    metrics = ReconstructionMetrics()
    model.eval()
    with torch.no_grad():
        for batch in val.split(64):
            metrics.update(batch, model(batch).recon)
    result = metrics.result()
    return {"psnr": result["psnr"], "ssim": result["ssim"], "hf_ratio": result["hf_ratio"], "train_s": seconds}


def _engine_step(model, loss, args):
    """The training engine's step for `model`: its own loss (`loss` None), or the adversarial
    task's (LPIPS, discriminator, adaptive weight) with the `loss` section. (runner, losses)."""
    import tempfile

    import torch

    from tokenmill.pipeline.shards.stream import to_model_input
    from tokenmill.pipeline.training.config import TrainJobConfig
    from tokenmill.pipeline.training.context import LocalContext
    from tokenmill.pipeline.training.optim import OptimConfig, Part
    from tokenmill.pipeline.training.step import StepRunner, own_loss
    from tokenmill.pipeline.training.tasks.adversarial import AdversarialTask

    optim = OptimConfig(lr=args.lr, betas=(0.5, 0.9), grad_clip=1.0, ema_decay=0.0)
    parts = {"model": Part("model", model, model, optim)}
    if loss is None:
        return (StepRunner(parts, "fp32", torch.device("cpu")),
                lambda batch, step, parts: own_loss(to_model_input(batch), step, parts))
    task = AdversarialTask(TrainJobConfig.model_validate({"model": model.config, "loss": loss, "optim": optim}))
    task.setup(LocalContext(tempfile.mkdtemp(prefix="bench-vqgan-")))  # LPIPS and LeCAM on this process's CPU
    discriminator, disc_optim = task.build()["discriminator"]
    parts["discriminator"] = Part("discriminator", discriminator, discriminator, disc_optim)
    return StepRunner(parts, "fp32", torch.device("cpu")), task.losses


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tokenmill.models.lpips import LPIPSWeights, missing_weights
    from tokenmill.models.vqgan_loss import DiscriminatorConfig
    from tokenmill.pipeline.training.config import VQGANLossConfig

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.size, args.batch_size = min(args.steps, 12), 32, 4
    disc_start = args.disc_start if args.disc_start is not None else args.steps // 3
    train, val = _patches(args.size)
    lpips_missing = missing_weights(LPIPSWeights())
    adversarial = VQGANLossConfig(
        perceptual_weight=0.0 if lpips_missing else 0.1, adversarial_weight=args.adversarial_weight,
        disc_start=disc_start, discriminator=DiscriminatorConfig(channels=32, layers=2 if args.size < 64 else 3),
    )
    base = _model(args.size, args.seed)
    runs = {"recon": _train(copy.deepcopy(base), None, train, val, args, disc_start),
            "adversarial": _train(copy.deepcopy(base), adversarial, train, val, args, disc_start)}
    a, b = runs["recon"], runs["adversarial"]
    result = {
        "steps": args.steps, "batch_size": args.batch_size, "size": args.size, "disc_start": disc_start,
        "threads": args.threads,
        "val_crops": val.shape[0], "perceptual": lpips_missing and f"off: {lpips_missing}" or "on (LPIPS weight 0.1)",
        **runs, "hf_ratio_gain": b["hf_ratio"] - a["hf_ratio"], "psnr_cost_db": a["psnr"] - b["psnr"],
    }
    result["target_met"] = result["hf_ratio_gain"] >= 0.1 and result["psnr_cost_db"] <= 1.0
    _print(result)
    return result


def _print(r: dict[str, Any]) -> None:
    print(f"VQGAN on {r['size']} px patches of the sklearn sample photos: {r['steps']} steps of {r['batch_size']}, "
          f"discriminator from step {r['disc_start']}, {r['val_crops']} val crops; perceptual {r['perceptual']}")
    print(f"{'loss':<14}{'PSNR':>8}{'SSIM':>8}{'hf_ratio':>10}{'train s':>9}")
    for name in ("recon", "adversarial"):
        x = r[name]
        print(f"{name:<14}{x['psnr']:>8.2f}{x['ssim']:>8.3f}{x['hf_ratio']:>10.3f}{x['train_s']:>9.0f}")
    print(f"hf_ratio gain {r['hf_ratio_gain']:+.3f} (target >= +0.1), PSNR cost {r['psnr_cost_db']:.2f} dB "
          f"(target <= 1): {'met' if r['target_met'] else 'not met'}")
