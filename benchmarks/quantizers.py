"""`tokenmill bench quantizers`: each of our quantizer families vs vector-quantize-pytorch's.

For every family (VQ with EMA, VQ with the rotation trick, SimVQ, LFQ, FSQ, residual VQ) and
dataset (32×32 RGB patches of the photos shipped in scikit-learn; MNIST-5k), ours and the peer
sit in the same small VQ-VAE encoder/decoder (identical initial weights), with the same
codebook size, commitment weight, optimiser, batches and seed. Steps alternate between the two
models (and which goes first), so CPU contention hits both alike; the first steps are warm-up
and not timed (median step time). Validation on held-out images: codebook usage over the whole
split, PSNR and SSIM (`models.image_metrics.ssim`: Gaussian window 11, σ 1.5, equal to torchmetrics') of the reconstructions.

Targets per family: step_time_ratio (ours/peer) ≤ 0.8, usage ≥ the peer's, PSNR ≥ the peer's
− 0.2 dB; the summary says which hold.

The `vq` family on `mnist` is the VQ comparison (our `VectorQuantizer` vs `VectorQuantize`, K = 512,
dim 64, EMA decay 0.99, k-means init) that `bench vq` used to run on its own; its settings were
`--families vq --datasets mnist --steps 1000 --warmup 20 --batch-size 64 --lr 3e-4`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

from tokenmill.pipeline.shards.synthetic import mnist_tensors, photo_patches

LATENT_DIM = 64
DECAY = 0.99
DEAD_CODE_THRESHOLD = 2.0
BETA = 0.25
# LFQ's soft-assignment τ on both sides (the peer takes it per call, default 100; ours defaults to 1,
# see models/quantizers/lfq.py): the pair then differs in implementation, not in settings.
LFQ_INV_TEMPERATURE = 1.0
FAMILIES = ("vq", "vq-rotation", "simvq", "lfq", "fsq", "rvq")
OPTIONAL_FAMILIES = ("vq-l2-16k",)  # LlamaGen's 16,384 × 8 l2-normalised codes: slow on CPU
DATASETS = ("photos", "mnist")


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, nonnegative_int, positive_float, positive_int

    parser = subparsers.add_parser(
        "quantizers", help="every quantizer family vs vector-quantize-pytorch's, on photo patches and MNIST-5k",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=400, help="training steps per model (default %(default)s)")
    parser.add_argument("--warmup", type=nonnegative_int, default=10, help="untimed first steps (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default %(default)s: on a shared machine, one thread per process "
                             "keeps step times from waiting on descheduled sibling threads)")
    parser.add_argument("--train-patches", type=positive_int, default=4000, help="photo patches to train on")
    parser.add_argument("--val-images", type=positive_int, default=500, help="val images per dataset (default %(default)s)")
    parser.add_argument("--families", type=_names(FAMILIES + OPTIONAL_FAMILIES), default=list(FAMILIES),
                        help=f"comma-separated subset of {','.join(FAMILIES + OPTIONAL_FAMILIES)} (default: all but "
                             f"{','.join(OPTIONAL_FAMILIES)})")
    parser.add_argument("--datasets", type=_names(DATASETS), default=list(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    add_json_option(parser)
    parser.set_defaults(run=run)


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {','.join(allowed)}")
        return names

    return parse


def _ours(family: str, seed: int):
    """Our QuantizerConfig for `family`."""
    from tokenmill.models.quantizers import QuantizerConfig

    vq = dict(codebook_size=512, beta=BETA, decay=DECAY, kmeans_init=True, dead_code_threshold=DEAD_CODE_THRESHOLD,
              seed=seed)
    return {
        "vq": lambda: QuantizerConfig(kind="vq", **vq),
        "vq-rotation": lambda: QuantizerConfig(kind="vq", rotation_trick=True, **vq),
        "vq-l2-16k": lambda: QuantizerConfig(kind="vq", **(vq | dict(codebook_size=16384)), codebook_dim=8,
                                             cosine=True),
        "simvq": lambda: QuantizerConfig(kind="simvq", codebook_size=512, beta=BETA, rotation_trick=True, seed=seed),
        "lfq": lambda: QuantizerConfig(kind="lfq", bits=10, beta=BETA, entropy_weight=0.1, diversity=1.0,
                                       inv_temperature=LFQ_INV_TEMPERATURE, entropy_group_bits=10),
        "fsq": lambda: QuantizerConfig(kind="fsq", levels=(8, 5, 5, 5)),
        "rvq": lambda: QuantizerConfig(kind="rvq", num_stages=4, **(vq | dict(codebook_size=256))),
    }[family]()


def _peer_module(family: str):
    """vector-quantize-pytorch's counterpart, configured like `_ours(family)`."""
    import vector_quantize_pytorch as vqp

    vq = dict(dim=LATENT_DIM, codebook_size=512, decay=DECAY, commitment_weight=BETA, kmeans_init=True,
              kmeans_iters=10, threshold_ema_dead_code=DEAD_CODE_THRESHOLD)
    return {
        "vq": lambda: vqp.VectorQuantize(**vq, rotation_trick=False),
        "vq-rotation": lambda: vqp.VectorQuantize(**vq, rotation_trick=True),
        "vq-l2-16k": lambda: vqp.VectorQuantize(**(vq | dict(codebook_size=16384)), codebook_dim=8,
                                                use_cosine_sim=True, rotation_trick=False),
        "simvq": lambda: vqp.SimVQ(dim=LATENT_DIM, codebook_size=512, rotation_trick=True,
                                   input_to_quantize_commit_loss_weight=BETA),
        "lfq": lambda: vqp.LFQ(dim=LATENT_DIM, codebook_size=1024, entropy_loss_weight=0.1,
                               commitment_loss_weight=BETA, diversity_gamma=1.0),
        "fsq": lambda: vqp.FSQ(levels=[8, 5, 5, 5], dim=LATENT_DIM),
        "rvq": lambda: vqp.ResidualVQ(num_quantizers=4, **(vq | dict(codebook_size=256)), rotation_trick=False),
    }[family]()


def _peer_quantizer(family: str, codebook_size: int, stages: int, seed: int):
    """The peer behind our quantizer interface (`benchmarks.peers.PeerQuantizer`). Its random init
    (projections, codebooks) follows `seed`, as ours does, so --seed varies both sides."""
    import torch

    from tokenmill.benchmarks.peers import PeerQuantizer

    torch.manual_seed(seed)
    options = {"inv_temperature": LFQ_INV_TEMPERATURE} if family == "lfq" else {}
    return PeerQuantizer(_peer_module(family), codebook_size, stages, options)


def _models(family: str, channels: int, seed: int):
    """(ours, peer): the same VQ-VAE weights, differing only in the quantizer module."""
    import torch

    from tokenmill.models.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(seed)
    config = VQVAEConfig(in_channels=channels, image_size=32, hidden=32, res_blocks=1, downsample=4,
                         latent_dim=LATENT_DIM, quantizer=_ours(family, seed))
    ours = VQVAE(config)
    peer = copy.deepcopy(ours)
    stages = getattr(ours.quantizer, "num_stages", 1)
    peer.quantizer = _peer_quantizer(family, ours.codebook_size, stages, seed)
    return ours, peer


def _train(models: dict, x_train, args: argparse.Namespace) -> dict[str, list[float]]:
    """Trains both models on the same batches; returns each one's timed step seconds."""
    import torch

    optims = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    generator = torch.Generator().manual_seed(args.seed)
    order = list(models)
    for step in range(args.steps):
        batch = x_train[torch.randint(x_train.shape[0], (args.batch_size,), generator=generator)]
        for name in order:
            model, optim = models[name], optims[name]
            model.train()
            start = time.perf_counter()
            loss = model(batch).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
        order.reverse()  # neither model always runs second
    return times


def _validate(model, x) -> dict[str, float]:
    """Codebook usage over the whole split, PSNR and SSIM of its reconstructions."""
    import torch

    from tokenmill.models.code_usage import CodebookStats
    from tokenmill.models.image_metrics import psnr, ssim

    stages = getattr(model.quantizer, "num_stages", 1)
    stats, squared_error, ssim_sum = CodebookStats(model.codebook_size, stages), 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for batch in x.split(100):
            out = model(batch)
            stats.update(out.indices.reshape(-1, stages) if stages > 1 else out.indices)
            squared_error += float((out.recon - batch).pow(2).sum())
            ssim_sum += float(ssim(out.recon, batch).sum())
    mse = squared_error / x.numel()
    return {"val_usage": stats.usage, "val_perplexity": stats.perplexity,
            "val_psnr": psnr(torch.tensor(mse)).item(), "val_ssim": ssim_sum / x.shape[0]}


def _datasets(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    data = {}
    if "photos" in args.datasets:
        data["photos"] = (photo_patches("train", args.train_patches, seed=args.seed),
                          photo_patches("val", args.val_images, seed=args.seed))
    if "mnist" in args.datasets:
        data["mnist"] = (mnist_tensors("train")[0], mnist_tensors("val")[0][: args.val_images])
    return data


def _compare(family: str, x_train, x_val, args: argparse.Namespace) -> dict[str, Any]:
    """One family on one dataset: both models trained and validated, ratios and target checks."""
    models = dict(zip(("ours", "peer"), _models(family, x_train.shape[1], args.seed)))
    times = _train(models, x_train, args)
    row: dict[str, Any] = {"codebook_size": models["ours"].codebook_size}
    for name, model in models.items():
        # Median: robust to the other processes sharing the CPU.
        row[name] = {"step_ms": 1000 * statistics.median(times[name]), **_validate(model, x_val)}
    ours, peer = row["ours"], row["peer"]
    row["step_time_ratio"] = ours["step_ms"] / peer["step_ms"]
    row["targets"] = {"step_time_ratio<=0.8": row["step_time_ratio"] <= 0.8,
                      "usage>=peer": ours["val_usage"] >= peer["val_usage"],
                      "psnr>=peer-0.2": ours["val_psnr"] >= peer["val_psnr"] - 0.2}
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    import sys

    import torch
    from tqdm import tqdm

    threads, before = getattr(args, "threads", 1), torch.get_num_threads()
    result: dict[str, Any] = {"steps": args.steps, "batch_size": args.batch_size, "latent_dim": LATENT_DIM,
                              "threads": threads, "results": {}}
    data = _datasets(args)
    jobs = [(dataset, family) for dataset in data for family in args.families]
    torch.set_num_threads(threads)
    try:
        for dataset, family in tqdm(jobs, desc="quantizer pairs", unit="pair", file=sys.stderr):
            x_train, x_val = data[dataset]
            result["results"].setdefault(dataset, {})[family] = _compare(family, x_train, x_val, args)
    finally:
        torch.set_num_threads(before)  # a caller in the same process (a test) keeps its setting
    for dataset, (x_train, x_val) in data.items():
        result[f"{dataset}_images"] = {"train": x_train.shape[0], "val": x_val.shape[0]}
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(f"quantizers in a VQ-VAE (latent dim {LATENT_DIM}), {result['steps']} steps of {result['batch_size']}; "
          "ours vs vector-quantize-pytorch")
    print(f"{'dataset':<8}{'family':<12}{'K':>7}{'ms ours/peer':>16}{'ratio':>7}"
          f"{'usage ours/peer':>17}{'PSNR ours/peer':>16}{'SSIM ours/peer':>16}  targets met")
    for dataset, families in result["results"].items():
        for family, r in families.items():
            o, p = r["ours"], r["peer"]
            met = sum(r["targets"].values())
            print(f"{dataset:<8}{family:<12}{r['codebook_size']:>7}{o['step_ms']:>8.1f}/{p['step_ms']:<7.1f}"
                  f"{r['step_time_ratio']:>7.2f}{o['val_usage']:>9.3f}/{p['val_usage']:<7.3f}"
                  f"{o['val_psnr']:>8.2f}/{p['val_psnr']:<7.2f}{o['val_ssim']:>8.3f}/{p['val_ssim']:<7.3f}"
                  f"  {met}/{len(r['targets'])}")
