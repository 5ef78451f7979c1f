"""`tokenmill convert REF OUT`: a published checkpoint as a tokenmill model folder, written once.

REF: `taming:PATH` — a taming-transformers VQGAN log folder (checkpoints/last.ckpt + configs/*.yaml),
a .ckpt with its YAML beside it or in ../configs/, or `taming:CKPT,YAML`; `llamagen:PATH` — a LlamaGen
VQ-16/VQ-8 `.pt` (image size: the checkpoint's saved args, else 256; or `llamagen:CKPT,IMAGE_SIZE`);
`magvit2:CKPT,YAML` — an Open-MAGVIT2 LFQ .ckpt and its YAML (or a .ckpt with one YAML beside it).
OUT: a folder or fsspec URL that then works wherever a model is taken (tokenize, decode, eval,
train.init_from, retrain); its config.json records the source checkpoint's sha256
(`extra.converted_from`). Every command also takes REF itself and converts it in memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokenmill.jobs.cli import add_json_option, json_object, output_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="write a published checkpoint (taming:…, llamagen:…, magvit2:…) as a tokenmill model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="taming:PATH (a log folder, a .ckpt, or CKPT,YAML) llamagen:PATH (a .pt, or CKPT,IMAGE_SIZE) or magvit2:CKPT,YAML")
    parser.add_argument("out", type=output_path(marks=("config.json", "model.safetensors"), convert=str),
                        help="model folder or fsspec URL to write (config.json + model.safetensors)")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="fsspec options for OUT, e.g. '{\"anon\": true}'")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.pipeline.registry.convert import convert_checkpoint

    summary = convert_checkpoint(args.ref, args.out, args.storage_options)
    source = summary["converted_from"]
    print(f"converted {args.ref} ({source['kind']}, checkpoint sha256 {source['checkpoint_sha256'][:12]}…) "
          f"to a {summary['class']} at {args.out}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("convert"))
