"""What a tokenize run is asked for: `TokenizeOptions`, checked once, when it is built.

Each numeric setting has one check here (`CHECKS`): a function of the value that raises
`ValueError` saying what is wrong ("must be >= 1, got 0"). `TokenizeOptions` runs them at
construction and turns a failure into a `UserError` naming the CLI option ("--batch-size must be
>= 1, got 0"); `tokenmill tokenize` runs the same functions as argparse `type=`s (`cli_type`), so a
bad number gets argparse's one-line error (exit 2) before anything starts. The latent mode, size,
crop and augmentation are checked by `pipeline.tokens.extraction.ExtractionOptions.build`, also at
construction (`TokenizeOptions.extraction` holds the result). This module imports neither torch nor
Ray at import time: the CLI's `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions

PRECISIONS = ("fp32", "bf16", "fp16")  # the encoder's autocast dtype; codes are still chosen in fp32


def at_least(low: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        return value

    return check


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
        return value

    return check


# field -> its check; None (the default of the optional ones) means "decide from the cluster / model"
CHECKS: dict[str, Callable[[Any], Any]] = {
    "batch_size": at_least(1),
    "actors": at_least(1),
    "gpus": at_least(0),
    "decode_threads": at_least(1),
    "precision": one_of(PRECISIONS),
}


def cli_type(field: str) -> Callable[[str], int]:
    """argparse `type=` for the integer option of `field`: parses, then runs the field's check."""
    check = CHECKS[field]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """How `tokenize_dataset` encodes a dataset (everything but the model, data and store URLs)."""

    batch_size: int = 256
    overwrite: bool = False  # replace a store made by another model or config
    latents: bool | str = False  # False: codes; True/"mean" or "sample": latents (VAE family, AutoencoderKL)
    size: int | None = None  # diffusers models: image size (default: the config's)
    crop: str | None = None  # diffusers models: "center" (default) or "resize"
    augment: str | None = None  # store each sample's variants ("flip")
    actors: int | None = None  # most encoding actors (default: one per GPU, else per CPU core)
    gpus: int | None = None  # GPU actors, up to N (0: CPU only; None: GPUs if the cluster has any)
    precision: str = "fp32"  # one of PRECISIONS
    decode_threads: int | None = None  # image decode threads (= CPUs reserved) per actor
    tracking_uri: str | None = None  # MLflow, for runs:/ and models:/ references
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # fsspec kwargs: secrets
    # Built from latents/size/crop/augment at construction (not an argument).
    extraction: ExtractionOptions = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from tokenmill.models.errors import UserError

        for name, check in CHECKS.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                check(value)
            except ValueError as err:
                raise UserError(f"--{name.replace('_', '-')} {err}") from None
        from tokenmill.pipeline.tokens.extraction import ExtractionOptions

        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        # latents, size, crop, augment: a UserError naming the option
        extraction = ExtractionOptions.build(self.latents, self.size, self.crop, self.augment)
        object.__setattr__(self, "extraction", extraction)
