"""`tokenmill tokenize --model MODEL --data SHARDS --out STORE`: a whole dataset into a Zarr token store.

The driver resolves the model and the manifest, plans every input shard's row range, creates
(or checks the lineage of) the store, then streams the unfinished work units (an input shard, or
a few consecutive ones in very large stores) through a Ray Data actor pool: each actor holds the
model and writes its unit's rows and marker (`pipeline.tokens.encode_unit`). Finally the driver merges the markers into the report
and codebook statistics. Killed anywhere, the same command resumes and ends with the same arrays.

Also `python -m tokenmill.jobs.tokenize ...`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_json_option, output_path, positive_int
from tokenmill.pipeline.tokenize.options import PRECISIONS, cli_type

if TYPE_CHECKING:
    from tokenmill.pipeline.tokenize.driver import TokenizeSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenize", help="encode a sharded dataset into a Zarr token store",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory/URL, runs:/ID/model, models:/NAME/VERSION, "
                        "models:/NAME@ALIAS, or diffusers:PATH (a VQModel/AutoencoderKL/AutoencoderDC save_pretrained folder or URL, "
                        "or a hub id in the local Hugging Face cache), or taming:PATH (a taming VQGAN checkpoint, converted) "
                        "or llamagen:PATH (a LlamaGen VQ-16/VQ-8 .pt, converted) or magvit2:CKPT,YAML (Open-MAGVIT2 LFQ, converted)")
    parser.add_argument("--data", required=True, help="shard folder/URL with manifest.json (indexed on the fly if absent)")
    parser.add_argument("--out", required=True, type=output_path(marks=("zarr.json",), convert=str),
                        help="token store URL (any fsspec URL)")
    parser.add_argument("--batch-size", type=cli_type("batch_size"), default=256)
    parser.add_argument("--overwrite", action="store_true", help="replace a store made by another model or config")
    parser.add_argument("--latents", nargs="?", const="mean", default=None, choices=["mean", "sample"],
                        help="VAE models and diffusers AutoencoderKL: store latents (float16): the posterior mean "
                        "(default) or a sample seeded by the sample's key (a diffusers AutoencoderDC stores its latents without the flag)")
    parser.add_argument("--size", type=positive_int, default=None, help="diffusers models: image size (default: the config's)")
    parser.add_argument("--crop", default=None, choices=["center", "resize"],
                        help="diffusers models: center crop (default) or squash to the size")
    parser.add_argument("--augment", default=None, choices=["flip"],
                        help="store each sample's variants (flip: as is and mirrored); readers pick one per epoch")
    parser.add_argument("--actors", type=cli_type("actors"), default=None,
                        help="most encoding actors (default: one per GPU, else per CPU core, of the cluster)")
    parser.add_argument("--gpus", type=cli_type("gpus"), default=None,
                        help="GPU actors, up to N (0: CPU only; default: GPUs if the cluster has any; "
                             "pass N on a cluster that autoscales GPU nodes from zero)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="encoder autocast dtype, tokenmill and diffusers models; codes are still chosen in fp32; "
                        "fp16 is refused for a diffusers VAE that sets force_upcast (default %(default)s)")
    parser.add_argument("--decode-threads", type=cli_type("decode_threads"), default=None,
                        help="image decode threads (= CPUs reserved) per actor (default: 1 on CPU, "
                             "on GPU the node's CPUs per GPU)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ "
                        "(default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> TokenizeSummary:
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    options = TokenizeOptions(
        batch_size=args.batch_size, overwrite=args.overwrite, latents=args.latents or False, size=args.size,
        crop=args.crop, augment=args.augment, actors=args.actors, gpus=args.gpus, precision=args.precision,
        decode_threads=args.decode_threads, tracking_uri=args.tracking_uri,
    )
    summary = tokenize_dataset(args.model, args.data, args.out, options)
    print(f"tokenized {summary.samples} samples ({summary.corrupt} corrupt skipped) into {args.out}: "
          f"{summary.encoded_now} now at {summary.img_per_s:.0f} img/s (start-up {summary.startup_s:.1f} s), "
          f"{summary.skipped_shards} shards already done", file=sys.stderr)
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("tokenize"))
