"""`tokenmill bench prior-families`: the three prior families (AR, MaskGIT, VAR) side by side on MNIST-5k.

Built from `tokenmill bench prior`'s pieces (benchmarks/prior.py):
1. Tokenizers: the demo's VQ-VAE (8x8 codes from 512) and the same encoder/decoder with
   `quantizer.kind: multiscale` (`--scales`, ending at the 8x8 grid; VAR's tokenizer), each trained
   `--vq-steps` steps; optionally a third multi-scale one (`--budget-scales`, default 1,8: 65 codes,
   the nearest a multi-scale tokenizer ending at 8x8 gets to the single-scale 64) for PSNR and usage
   only. Per tokenizer: codes per image, val PSNR, val codebook usage (every scale counted in the
   one shared codebook).
2. Token stores: MNIST-5k tokenized in-process by the single-scale VQ-VAE (AR, MaskGIT) and by
   the multi-scale one (VAR: one level per scale).
3. The judge: the same CNN classifier as `bench prior`.
4. Per family, an equal training budget: the same steps, batch, learning rate, width, depth,
   heads, dropout and label dropout (each kind's own positions), in-memory batches; then val
   loss per token in bits (AR, VAR: next-token / next-scale cross-entropy per code; MaskGIT: per
   masked code under its seeded eval masks, not a likelihood), class accuracy and
   classifier-space FD of `--per-class` CFG samples per class, and samples/s: images per second
   of `prior.sample` at each `--speed-rows` batch of labelled rows, the same CFG and device for
   every family (KV cache on for AR and VAR, MaskGIT at its default steps), median of 3 after a
   warm-up; the rate of the quality samples (batches of up to 500) next to them. Ratios are
   against AR.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenmill.benchmarks.prior import (
    Stages,
    add_prior_options,
    bits_per_token,
    sample_quality,
    tokenize_in_process,
    train_classifier,
    train_prior,
    train_tokenizer,
)

FAMILIES = {"ar": "prior", "maskgit": "maskgit", "var": "var"}  # family -> `kind` of its prior config
MULTISCALE = ("model.quantizer.kind=multiscale",)  # + model.quantizer.scales=[...]


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, output_folder

    parser = subparsers.add_parser("prior-families", help="AR vs MaskGIT vs VAR priors on MNIST-5k, equal budget",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prior_options(parser)
    parser.add_argument("--families", type=_families, default="ar,maskgit,var",
                        help="comma list of " + ", ".join(FAMILIES) + " (default %(default)s)")
    parser.add_argument("--scales", type=_scales, default="1,2,3,4,6,8",
                        help="the multi-scale tokenizer's (VAR's) scales, ending at the 8x8 grid (default %(default)s)")
    parser.add_argument("--budget-scales", type=_scales, default="1,8", help="scales of a multi-scale tokenizer "
                        "trained for PSNR and usage only, near the 8x8 VQ-VAE's 64 codes; 'none' skips it "
                        "(default %(default)s)")
    parser.add_argument("--speed-rows", type=_counts, default="1,32", help="comma list of batch sizes (rows) at "
                        "which samples/s is timed (default %(default)s)")
    parser.add_argument("--grids", type=output_folder, default=None, help="write a sample grid PNG per family here")
    add_json_option(parser)
    parser.set_defaults(run=run)


def _families(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"families are a comma list of {', '.join(FAMILIES)}; got {text!r}")
    return names


def _counts(text: str) -> list[int]:
    from tokenmill.jobs.cli import positive_int

    return [positive_int(part) for part in text.split(",")]


def _scales(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "none":
        return None
    try:
        from tokenmill.models.quantizers import check_scales

        return check_scales(text.split(","), side=8)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return benchmark(args.workdir, args)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-prior-families-") as tmp:
        return benchmark(Path(tmp), args)


def benchmark(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tokenmill.pipeline.prior.sampling import resolve_device
    from tokenmill.pipeline.shards.synthetic import mnist_tensors

    torch.set_num_threads(args.threads)
    started, stages = time.perf_counter(), Stages()
    result: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k not in ("run", "json", "command", "benchmark")}}
    val = mnist_tensors("val")
    with stages("tokenizers"):
        tokenizers = train_tokenizers(root, args, val[0])
    with stages("classifier"):
        classifier, result["classifier_val_accuracy"] = train_classifier(args)
    device = resolve_device(args.device)
    result["device"], result["families"] = str(device), {}
    result["tokenizers"] = {name: entry["quality"] for name, entry in tokenizers.items()}
    for family in args.families:
        entry = tokenizers["multiscale" if family == "var" else "vq"]
        with stages(f"prior {family}"):
            result["families"][family] = evaluate_family(family, entry, classifier, val, device, args)
    _add_ratios(result["families"])
    result["acceptance"] = acceptance(result)
    result["stage_seconds"], result["seconds"] = stages.seconds, time.perf_counter() - started
    result["table"] = print_tables(result)
    return result


def train_tokenizers(root: Path, args: argparse.Namespace, x_val) -> dict[str, dict[str, Any]]:
    """name -> {"tokenizer", "store" (a token store URL, or None), "quality"}: "vq" (the demo's
    VQ-VAE; its store when AR or MaskGIT runs), "multiscale" (`--scales`, when VAR runs) and
    "budget" (`--budget-scales`, no store) unless 'none' or the same scales."""
    import torch

    wanted = {"vq": (None, bool({"ar", "maskgit"} & set(args.families)))}  # name -> (scales, a store?)
    if "var" in args.families:
        wanted["multiscale"] = (args.scales, True)
    if args.budget_scales is not None and args.budget_scales != args.scales:
        wanted["budget"] = (args.budget_scales, False)
    out = {}
    for name, (scales, store) in wanted.items():
        overrides = () if scales is None else _multiscale(scales)
        torch.manual_seed(args.seed)
        begun = time.perf_counter()
        tokenizer, path = train_tokenizer(root / f"tokenizer-{name}", args, overrides)
        seconds = time.perf_counter() - begun
        url = tokenize_in_process(path, root, f"tokens-{name}.zarr") if store else None
        quality = {"quantizer": "vq" if scales is None else f"multiscale {','.join(map(str, scales))}", **tokenizer_quality(tokenizer, x_val),
                   "train_seconds": round(seconds, 1)}
        out[name] = {"tokenizer": tokenizer, "store": url, "quality": quality}
    return out


def _multiscale(scales: tuple[int, ...]) -> tuple[str, ...]:
    return (*MULTISCALE, f"model.quantizer.scales=[{','.join(map(str, scales))}]")


def tokenizer_quality(tokenizer, images) -> dict[str, Any]:
    """Codes per image, val PSNR (dB) and val codebook usage (one shared codebook: a multi-scale
    tokenizer's scales counted together) of `tokenizer` on images (N, 1, 32, 32) in [0, 1]."""
    import math

    import torch

    from tokenmill.models.code_usage import CodebookStats
    from tokenmill.models.image_metrics import ReconstructionMetrics
    from tokenmill.models.tokenizer import counted_levels
    from tokenmill.pipeline.prior.sampling import level_shapes

    metrics, counts = ReconstructionMetrics(), CodebookStats(tokenizer.codebook_size)
    with torch.no_grad():
        for part in images.split(250):
            output = tokenizer(part)
            metrics.update(part, output.recon.float())
            counts.update(counted_levels(tokenizer, output.indices)[0])
    shapes = level_shapes(tokenizer)
    return {"levels": [list(s) for s in shapes], "codes_per_image": sum(math.prod(s) for s in shapes),
            "val_psnr": metrics.result()["psnr"], "val_usage": counts.usage}


def build_prior(family: str, store_url: str, args: argparse.Namespace):
    """A fresh prior of `family` for the store's vocabulary and grid, at the shared width/depth."""
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.prior.config import prior_config
    from tokenmill.pipeline.prior.data import store_vocab
    from tokenmill.pipeline.tokens.dataset import TokenDataset

    vocab = store_vocab(TokenDataset(store_url, "train", add_bos=True, class_token=True, num_classes=10))
    fields = dict(kind=FAMILIES[family], codebook_size=vocab.codebook_size, grid=vocab.grid, num_classes=10,
                  dim=args.dim, depth=args.depth, heads=args.heads, dropout=args.dropout,
                  label_dropout=args.label_dropout)
    return build_model(prior_config(fields))


def evaluate_family(family: str, entry: dict[str, Any], classifier, val, device, args: argparse.Namespace):
    """Train one family's prior on its tokenizer's store and measure it (see the module docstring)."""
    import torch

    torch.manual_seed(args.seed)
    prior = build_prior(family, entry["store"], args).to(device)
    begun = time.perf_counter()
    trained = train_prior(prior, entry["store"], args, sources=("memory",))
    row: dict[str, Any] = {"train_seconds": time.perf_counter() - begun, "train_loss": trained["train_loss"],
                           "parameters": sum(p.numel() for p in prior.parameters()),
                           "codes_per_image": prior.config.seq_len}
    row |= bits_per_token(prior, entry["store"])
    row["val_bits_per_image"] = row["val_bits_per_token"] * prior.config.seq_len
    grid = None if args.grids is None else args.grids / f"prior_{family}.png"
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
    quality = sample_quality(prior, entry["tokenizer"], classifier, val, argparse.Namespace(**{**vars(args),
                                                                                              "grid": grid}))
    row |= {key: quality[key] for key in ("class_accuracy", "recon_class_accuracy", "fid_classifier",
                                          "fid_classifier_recon_floor", "fid_classifier_random_codes")}
    row |= {f"samples_per_s_b{rows}": sampling_speed(prior, rows, args.cfg, args.seed) for rows in args.speed_rows}
    row[f"samples_per_s_b{min(500, args.per_class * 10)}_bulk"] = quality["samples_per_s_cfg"]  # the quality draws
    return row


def sampling_speed(prior, rows: int, cfg: float, seed: int) -> float:
    """Images per second of `prior.sample` for `rows` labelled rows at guidance `cfg` (each
    family's defaults: KV cache, MaskGIT's steps): a warm-up draw, then the median of 3."""
    import torch

    device = prior.embed.weight.device
    labels = (torch.arange(rows) % 10).to(device)
    seconds = []
    for i in range(4):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        begun = time.perf_counter()
        prior.sample(rows, labels, cfg_scale=cfg, generator=generator).cpu()
        seconds.append(time.perf_counter() - begun)
    return rows / statistics.median(seconds[1:])


def _add_ratios(families: dict[str, dict[str, Any]]) -> None:
    """Each family's samples/s (every batch) and class accuracy relative to AR's, when AR ran."""
    ar = families.get("ar")
    for row in families.values():
        for key in [key for key in row if key.startswith("samples_per_s")]:
            row[f"{key}_vs_ar"] = row[key] / ar[key] if ar else None
        row["class_accuracy_vs_ar"] = row["class_accuracy"] - ar["class_accuracy"] if ar else None


def acceptance(result: dict[str, Any]) -> dict[str, bool | None]:
    """Issue 28's targets (None where the run lacks a family or tokenizer they need)."""
    families, tokenizers = result["families"], result["tokenizers"]
    ar, maskgit, var = (families.get(name) for name in ("ar", "maskgit", "var"))
    out: dict[str, bool | None] = {
        "maskgit_class_accuracy_within_0.03_of_ar": (maskgit["class_accuracy"] >= ar["class_accuracy"] - 0.03
                                                     if ar and maskgit else None),
        "var_class_accuracy_0.9": var["class_accuracy"] >= 0.9 if var else None,
    }
    for rows in result["args"]["speed_rows"]:
        for name, row in (("maskgit", maskgit), ("var", var)):
            out[f"{name}_samples_per_s_5x_ar_b{rows}"] = row[f"samples_per_s_b{rows}_vs_ar"] >= 5 if ar and row else None
    single = tokenizers.get("vq")
    for name in ("multiscale", "budget"):
        multi = tokenizers.get(name)
        out[f"{name}_psnr_within_1db_of_vq"] = multi["val_psnr"] >= single["val_psnr"] - 1 if multi and single else None
        out[f"{name}_usage_0.9"] = multi["val_usage"] >= 0.9 if multi else None
    return out


FAMILY_ROWS = ("train_seconds", "parameters", "codes_per_image", "val_bits_per_token", "val_bits_per_image",
               "class_accuracy", "class_accuracy_vs_ar", "recon_class_accuracy", "fid_classifier",
               "fid_classifier_recon_floor")  # then every samples_per_s_* key
TOKENIZER_COLUMNS = ("codes_per_image", "val_psnr", "val_usage", "train_seconds")


def print_tables(result: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Prints the tokenizers, the families side by side and the acceptance; returns the two tables
    as rows of cells (the header first)."""
    def fmt(value) -> str:
        if value is None:
            return "n/a"
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"

    tokenizers = [["tokenizer", "quantizer", *TOKENIZER_COLUMNS]] + [
        [name, q["quantizer"], *(q[c] for c in TOKENIZER_COLUMNS)] for name, q in result["tokenizers"].items()]
    names = list(result["families"])
    speeds = [key for key in result["families"][names[0]] if key.startswith("samples_per_s")]
    families = [["metric", *names]] + [[key, *(result["families"][f].get(key) for f in names)]
                                       for key in (*FAMILY_ROWS, *speeds)]
    for table in (tokenizers, families):
        text = [[c if isinstance(c, str) else fmt(c) for c in cells] for cells in table]
        widths = [max(len(cells[i]) for cells in text) + 2 for i in range(len(text[0]))]
        for cells in text:
            print(cells[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:])))
        print()
    print(f"{'classifier_val_accuracy':<28}{fmt(result['classifier_val_accuracy']):>14}")
    for key, ok in result["acceptance"].items():
        print(f"{key:<44}{'n/a' if ok is None else ('yes' if ok else 'NO'):>6}")
    return {"tokenizers": tokenizers, "families": families}
