"""`tokenmill eval --model MODEL --data SHARDS [--split val] [--json PATH]`: a tokenizer's
reconstruction quality and code usage over a whole split, under a pinned protocol
(pipeline/tokenizer_eval.py): PSNR, SSIM, hf_ratio, usage / perplexity / code entropy, and LPIPS and
rFID when their weights exist ("unavailable: <which file where>" otherwise). The protocol
(resolution, resize filter, crop, split, N, evaluator, Inception weights sha256) is in the result.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_inception_options, add_json_option, json_object, output_path, positive_int

if TYPE_CHECKING:
    from tokenmill.pipeline.tokenizer_eval import EvalSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure a tokenizer over a whole split: PSNR, SSIM, codebook usage, LPIPS, rFID",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model directory/URL, runs:/…, models:/NAME/VERSION or @ALIAS, "
                        "diffusers:PATH (VQModel, AutoencoderKL: its posterior mean, AutoencoderDC)")
    parser.add_argument("--data", required=True, help="shard folder/URL with manifest.json")
    parser.add_argument("--split", default="val", help="split to evaluate (default %(default)s)")
    parser.add_argument("--out", type=output_path(marks=("reconstructions.png",)), default="eval", help="folder for reconstructions.png "
                        "(default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lpips-vgg", default=None, help="torchvision's vgg16-397923af.pth, a path or a URL (s3://, https://; "
                        "checked against the published sha256, cached) (default: torch hub cache)")
    parser.add_argument("--lpips-lin", default=None, help="lpips' weights/v0.1/vgg.pth (default: installed lpips "
                        "package, else the torch hub cache)")
    add_inception_options(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow to read runs:/ and models:/ from and log to "
                        "(default: MLFLOW_TRACKING_URI if set; models are also looked up in ./runs/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="log the result to this MLflow experiment (default "
                        "tokenmill-eval, with a tracking URI); without one, to the project's runs/mlflow.db")
    parser.add_argument("--storage-options", type=json_object, default={}, help="fsspec options as JSON")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> EvalSummary:
    from tokenmill.models.lpips import LPIPSWeights
    from tokenmill.pipeline.generation_eval import InceptionWeights
    from tokenmill.pipeline.tokenizer_eval import EvalOptions, evaluate

    options = EvalOptions(batch_size=args.batch_size, lpips=LPIPSWeights(args.lpips_vgg, args.lpips_lin, verify_sha256=False),
                          inception=InceptionWeights(args.inception, args.inception_sha256, args.storage_options),
                          storage_options=args.storage_options,
                          tracking_uri=args.tracking_uri, experiment=args.experiment)
    summary = evaluate(args.model, args.data, args.split, args.out, options)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in summary.metrics.items())
    print(f"evaluated {summary.model} on {summary.split}: {shown}")
    for name, info in (("lpips", summary.lpips), ("rfid", summary.rfid)):
        if isinstance(info, str):
            print(f"  {name}: {info}")
    print(f"  png       {summary.png}")
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("eval"))
