"""`tokenmill sample --prior MODEL --out DIR`: sample a trained prior and decode the codes to images.

MODEL is a prior from `tokenmill train-prior` (directory/URL, runs:/ID/model, models:/NAME@ALIAS):
an autoregressive one (`kind: prior`) or a MaskGIT one (`kind: maskgit`; `--steps K` parallel steps).
Its lineage.json names the tokenizer (checked by weights sha256); `--tokenizer` replaces it after a
compatibility check. Writes DIR/samples.png (one row per class), DIR/codes.npy and DIR/labels.npy.

`--eval REF.npz` (from `tokenmill fid-stats`) scores the samples: gFID, Inception Score,
precision/recall (k = 3) with FID's Inception (`--inception`), the protocol (resolution, N, CFG,
evaluator, weights sha256, ...) in the JSON summary and, with a tracking URI, in an MLflow run; the
field's convention is `--per-class 50`, the default with --eval. `--npz PATH` writes the samples as
the ADM evaluator's .npz (`arr_0` uint8 NHWC, `arr_1` labels).

Also `python -m tokenmill.jobs.sample ...`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import (
    add_inception_options,
    add_json_option,
    nonnegative_float,
    nonnegative_int,
    output_path,
    positive_float,
    positive_int,
    probability,
)

if TYPE_CHECKING:
    from tokenmill.pipeline.prior.sampling import SampleSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="sample a trained prior and decode the codes to a PNG grid",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", required=True, help="prior model: directory/URL, runs:/ID/model, models:/NAME@ALIAS")
    parser.add_argument("--out", required=True, type=output_path(marks=("samples.png", "codes.npy", "labels.npy")),
                        help="folder for samples.png, codes.npy, labels.npy")
    parser.add_argument("--class", dest="classes", type=nonnegative_int, action="append", default=[],
                        metavar="C", help="class to sample (repeatable; default: every class)")
    parser.add_argument("--n", "--per-class", dest="n", type=positive_int, default=None,
                        help="samples per class (default 8; 50 with --eval)")
    parser.add_argument("--cfg", type=nonnegative_float, default=1.0,
                        help="class-free guidance scale s >= 0: uncond + s (cond - uncond); 1 = none, 0 = unconditional")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="MaskGIT priors only: parallel decoding steps (default: the prior's sample_steps)")
    parser.add_argument("--tokenizer", default=None, help="decode with this tokenizer instead of the lineage's")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/, for "
                        "the tokenizer when its recorded copies and registry fail, and for the --eval run "
                        "(default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db)")
    parser.add_argument("--eval", dest="eval_ref", default=None, metavar="REF.npz",
                        help="score the samples against these reference statistics (tokenmill fid-stats)")
    parser.add_argument("--npz", type=output_path(folder=False, convert=str), default=None, metavar="PATH",
                        help="also write the samples as ADM's .npz")
    add_inception_options(parser)
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> SampleSummary:
    from tokenmill.pipeline.generation_eval import InceptionWeights, SampleEval
    from tokenmill.pipeline.prior.sampling import SampleOptions, sample_prior

    options = SampleOptions(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, steps=args.steps)
    evaluate = None
    if args.eval_ref or args.npz:
        evaluate = SampleEval(args.eval_ref, args.npz, InceptionWeights(args.inception, args.inception_sha256))
    n = args.n or (50 if args.eval_ref else 8)
    summary = sample_prior(args.prior, args.out, classes=args.classes, n=n, options=options,
                           tokenizer_ref=args.tokenizer, device=args.device, tracking_uri=args.tracking_uri,
                           evaluate=evaluate)
    print(f"sampled {summary.samples} images ({summary.tokens_per_s:.0f} tokens/s on {summary.device}); "
          f"wrote {summary.png}, codes {tuple(summary.codes_shape)} to {summary.codes}", file=sys.stderr)
    if summary.evaluation:
        shown = "  ".join(f"{k}={v:.4g}" for k, v in summary.evaluation["metrics"].items())
        print(f"scored {summary.samples} samples against {args.eval_ref}: {shown}")
        for name, why in summary.evaluation["unavailable"].items():
            print(f"  {name}: {why}")
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("sample"))
