"""`tokenmill sample --prior MODEL --out DIR`: sample a trained prior and decode the codes to images.

MODEL is a prior from `tokenmill train-prior` (directory/URL, runs:/ID/model, models:/NAME@ALIAS):
an autoregressive one (`kind: prior`) or a MaskGIT one (`kind: maskgit`; `--steps K` parallel steps).
Its lineage.json names the tokenizer (checked by weights sha256); `--tokenizer` replaces it after a
compatibility check. Writes DIR/samples.png (one row per class), DIR/codes.npy and DIR/labels.npy.

Also `python -m tokenmill.jobs.sample ...`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_json_option, nonnegative_int, output_folder, positive_float, positive_int

if TYPE_CHECKING:
    from tokenmill.pipeline.prior.sampling import SampleSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="sample a trained prior and decode the codes to a PNG grid",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", required=True, help="prior model: directory/URL, runs:/ID/model, models:/NAME@ALIAS")
    parser.add_argument("--out", required=True, type=output_folder, help="folder for samples.png, codes.npy, labels.npy")
    parser.add_argument("--class", dest="classes", type=nonnegative_int, action="append", default=[],
                        metavar="C", help="class to sample (repeatable; default: every class)")
    parser.add_argument("--n", type=positive_int, default=8, help="samples per class (default %(default)s)")
    parser.add_argument("--cfg", type=float, default=1.0, help="class-free guidance scale (1 = none)")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--top-p", type=positive_float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="MaskGIT priors only: parallel decoding steps (default: the prior's sample_steps)")
    parser.add_argument("--tokenizer", default=None, help="decode with this tokenizer instead of the lineage's")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/, and for "
                        "the tokenizer when its recorded copies and registry fail (default: MLFLOW_TRACKING_URI, "
                        "else ./runs/mlflow.db)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> SampleSummary:
    from tokenmill.pipeline.prior.sampling import SampleOptions, sample_prior

    options = SampleOptions(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, steps=args.steps)
    summary = sample_prior(args.prior, args.out, classes=args.classes, n=args.n, options=options,
                           tokenizer_ref=args.tokenizer, device=args.device, tracking_uri=args.tracking_uri)
    print(f"sampled {summary.samples} images ({summary.tokens_per_s:.0f} tokens/s on {summary.device}); "
          f"wrote {summary.png}, codes {tuple(summary.codes_shape)} to {summary.codes}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("sample"))
