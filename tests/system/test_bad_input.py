"""Bad input, systematically: every `tokenmill` subcommand fed missing paths, folders that are not
what it expects, corrupt files, out-of-range numbers and wrong types.

The product rule for a user mistake: ONE message on stderr naming the cause and the user's own
argument (the path or value they typed), exit code 2, no traceback. argparse's own refusals
(a usage block, then one `error:` line naming the argument) count as one message.

Every case runs as `python -m jobs ...` would, in one of two fresh processes (each runs half of the
cases one after the other: helpers/cli_batch.py gives each case its exit code and what it wrote to
file descriptors 1 and 2). A bad input must be refused before Ray starts: the processes get their
own RAY_TMPDIR, which must hold no Ray session afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO
from helpers.tokens import build_store

RETRAIN = str(REPO / "configs" / "debug_retrain_vqvae.yaml")
TRAIN = str(REPO / "configs" / "debug_vqvae.yaml")
VAR_PRIOR = str(REPO / "configs" / "debug_var.yaml")
PRIOR = str(REPO / "configs" / "debug_prior.yaml")
MASKGIT = str(REPO / "configs" / "debug_maskgit.yaml")
VAE = str(REPO / "configs" / "debug_vae.yaml")
VQGAN = str(REPO / "configs" / "debug_vqgan.yaml")

# (id, argv with {F} = the fixture folder, what the message must contain: the user's argument).
# For a --set override the user's argument is the override itself.
# Each training case has its own run.root: the two batch processes run cases side by side, and a
# refused run removes the empty run folder it made (test_no_bad_input_wrote_anything checks it).
CASES = [
    # -- demo
    ("demo-steps-0", "demo --root {F}/demo --steps 0", ["--steps", "0"]),
    ("demo-workers-0", "demo --root {F}/demo --workers 0", ["--workers", "0"]),
    ("demo-root-is-a-file", "demo --root {F}/imgs.npy --steps 1", ["{F}/imgs.npy"]),
    # -- shard
    ("shard-missing-src", "shard {F}/missing {F}/out", ["{F}/missing"]),
    ("shard-empty-folder", "shard {F}/empty {F}/out", ["{F}/empty"]),
    ("shard-garbage-npy", "shard {F}/texts/a.npy {F}/out", ["{F}/texts/a.npy"]),
    ("shard-missing-labels", "shard {F}/imgs.npy {F}/out --labels {F}/missing.npy", ["{F}/missing.npy"]),
    ("shard-dest-is-a-file", "shard {F}/imgs.npy {F}/texts/a.txt", ["{F}/texts/a.txt"]),
    # ShardSettings validates the numbers: the message names the setting and the value
    ("shard-maxcount-neg", "shard {F}/imgs.npy {F}/out --maxcount -1", ["maxcount", "-1"]),
    ("shard-val-fraction-2", "shard {F}/imgs.npy {F}/out --val-fraction 2", ["--val-fraction", "2"]),
    ("shard-maxcount-abc", "shard {F}/imgs.npy {F}/out --maxcount abc", ["--maxcount", "abc"]),
    ("shard-storage-options-not-json", "shard {F}/imgs.npy {F}/out --storage-options not-json",
     ["--storage-options", "not-json"]),
    ("shard-storage-options-list", "shard {F}/imgs.npy {F}/out --storage-options [1]", ["--storage-options", "[1]"]),
    # -- shard index
    ("index-missing", "shard index {F}/missing", ["{F}/missing"]),
    ("index-empty-folder", "shard index {F}/empty", ["{F}/empty"]),
    ("index-garbage-tar", "shard index {F}/badtar", ["{F}/badtar"]),
    ("index-storage-options-not-json", "shard index {F}/shards --storage-options not-json", ["not-json"]),
    # -- inspect
    ("inspect-missing", "inspect {F}/missing", ["{F}/missing"]),
    ("inspect-missing-tar", "inspect {F}/missing.tar", ["{F}/missing.tar"]),
    ("inspect-empty-folder", "inspect {F}/empty", ["{F}/empty"]),
    ("inspect-garbage-manifest", "inspect {F}/badmanifest", ["{F}/badmanifest"]),
    ("inspect-garbage-tar-folder", "inspect {F}/badtar", ["{F}/badtar"]),
    ("inspect-garbage-zarr", "inspect {F}/badzarr", ["{F}/badzarr"]),
    ("inspect-storage-options-not-json", "inspect {F}/shards --storage-options not-json", ["not-json"]),
    # -- train (refused before Ray, and before MLflow)
    ("train-missing-config", "train {F}/missing.yaml", ["{F}/missing.yaml"]),
    ("train-garbage-yaml", "train {F}/bad.yaml", ["{F}/bad.yaml"]),
    ("train-config-is-folder", "train {F}/empty", ["{F}/empty"]),
    ("train-steps-abc", "train {TRAIN} --set train.steps=abc", ["train.steps=abc"]),
    ("train-unknown-key", "train {TRAIN} --set train.stpes=3", ["train.stpes"]),
    ("train-gpus-this-machine-lacks", "train {TRAIN} --set scaling.use_gpu=true --set scaling.num_workers=64 "
     "--set data.shards={F}/shards --set run.root={F}/runs1", ["scaling.use_gpu"]),
    ("train-missing-shards", "train {TRAIN} --set data.shards={F}/missing --set run.root={F}/runs2",
     ["{F}/missing"]),
    ("train-garbage-manifest", "train {TRAIN} --set data.shards={F}/badmanifest --set run.root={F}/runs3",
     ["{F}/badmanifest"]),
    ("train-init-missing", "train {TRAIN} --set data.shards={F}/shards --set run.root={F}/runs4 "
     "--set train.init_from={F}/missing", ["{F}/missing"]),
    ("train-init-garbage-weights", "train {TRAIN} --set data.shards={F}/shards --set run.root={F}/runs5 "
     "--set train.init_from={F}/badweights", ["{F}/badweights"]),
    ("train-init-other-architecture", "train {TRAIN} --set data.shards={F}/shards --set run.root={F}/runs6 "
     "--set train.init_from={F}/model", ["{F}/model"]),
    ("train-freeze-unknown-part", "train {TRAIN} --set data.shards={F}/shards --set run.root={F}/runs "
     "--set train.freeze=[encoder,decodr]", ["train.freeze ['decodr']", "valid: encoder, quantizer, decoder"]),
    ("train-multiscale-scales-miss-the-grid", "train {TRAIN} --set model.quantizer.kind=multiscale "
     "--set model.quantizer.scales=[1,2,3]", ["quantizer.scales [1, 2, 3]", "grid side 4"]),
    # -- train-prior and sample
    ("train-prior-var-on-a-single-scale-store", "train-prior {VAR_PRIOR} --set data.store={F}/store.zarr "
     "--set run.root={F}/runs7", ["needs a multi-scale store", "one level 2x2"]),
    ("sample-steps-0", "sample --prior {F}/missing --out {F}/s --steps 0", ["--steps", "0"]),
    # -- tokenize
    ("tokenize-model-missing", "tokenize --model {F}/missing --data {F}/shards --out {F}/t0.zarr", ["{F}/missing"]),
    ("tokenize-model-empty", "tokenize --model {F}/empty --data {F}/shards --out {F}/t1.zarr", ["{F}/empty"]),
    ("tokenize-model-garbage-weights", "tokenize --model {F}/badweights --data {F}/shards --out {F}/t3.zarr",
     ["{F}/badweights"]),
    ("tokenize-model-garbage-config", "tokenize --model {F}/badconfig --data {F}/shards --out {F}/t4.zarr",
     ["{F}/badconfig"]),
    ("tokenize-data-missing", "tokenize --model {F}/model --data {F}/missing --out {F}/t5.zarr", ["{F}/missing"]),
    ("tokenize-data-empty", "tokenize --model {F}/model --data {F}/empty --out {F}/t6.zarr", ["{F}/empty"]),
    ("tokenize-data-garbage-manifest", "tokenize --model {F}/model --data {F}/badmanifest --out {F}/t8.zarr",
     ["{F}/badmanifest"]),
    ("tokenize-data-garbage-tar", "tokenize --model {F}/model --data {F}/badtar --out {F}/t9.zarr", ["{F}/badtar"]),
    ("tokenize-out-garbage-zarr", "tokenize --model {F}/model --data {F}/shards --out {F}/badzarr", ["{F}/badzarr"]),
    ("tokenize-out-foreign-zarr", "tokenize --model {F}/model --data {F}/shards --out {F}/foreignzarr",
     ["{F}/foreignzarr"]),
    ("tokenize-out-other-run", "tokenize --model {F}/model --data {F}/shards --out {F}/store.zarr", ["{F}/store.zarr"]),
    ("tokenize-out-is-a-file", "tokenize --model {F}/model --data {F}/shards --out {F}/imgs.npy", ["{F}/imgs.npy"]),
    ("tokenize-batch-size-0", "tokenize --model {F}/model --data {F}/shards --out {F}/t10.zarr --batch-size 0",
     ["--batch-size", "0"]),
    ("tokenize-actors-0", "tokenize --model {F}/model --data {F}/shards --out {F}/t11.zarr --actors 0",
     ["--actors", "0"]),
    ("tokenize-diffusers-missing", "tokenize --model diffusers:{F}/missing --data {F}/shards --out {F}/t12.zarr",
     ["diffusers:{F}/missing"]),
    ("tokenize-diffusers-not-an-autoencoder", "tokenize --model diffusers:{F}/unet --data {F}/shards --out {F}/t13.zarr",
     ["diffusers:{F}/unet", "UNet2DModel"]),
    ("tokenize-diffusers-tokenmill-model", "tokenize --model diffusers:{F}/model --data {F}/shards --out {F}/t14.zarr",
     ["diffusers:{F}/model", "not a VQModel, AutoencoderKL or AutoencoderDC"]),
    ("tokenize-latents-unknown", "tokenize --model {F}/model --data {F}/shards --out {F}/t15.zarr --latents median",
     ["--latents", "median"]),
    # -- retrain
    ("retrain-margin-negative", "retrain {RETRAIN} --set promotion.margin=-1", ["promotion.margin=-1"]),
    ("retrain-versions-missing", "retrain {RETRAIN} --set versions.prefix={F}/missing --set run.root={F}/runs8",
     ["{F}/missing"]),
    ("retrain-validation-missing", "retrain {RETRAIN} --set versions.prefix={F}/versions --set run.root={F}/runs9 "
     "--set validation.shards={F}/missing", ["{F}/missing"]),
    ("retrain-metric-needs-inception", "retrain {RETRAIN} --set promotion.metric=rfid "
     "--set promotion.inception.path={F}/missing.pth", ["promotion.metric rfid needs FID's Inception", "{F}/missing.pth"]),
    ("retrain-metric-gfid", "retrain {RETRAIN} --set promotion.metric=gfid", ["promotion.metric gfid", "prior_bits"]),
    # -- convert, fid-stats
    ("convert-missing-checkpoint", "convert taming:{F}/missing {F}/conv", ["taming:{F}/missing"]),
    ("fid-stats-missing-shards", "fid-stats {F}/missing --out {F}/r.npz", ["{F}/missing"]),
    # -- decode
    ("decode-missing-store", "decode {F}/missing --out {F}/dec", ["{F}/missing"]),
    ("decode-garbage-zarr", "decode {F}/badzarr --out {F}/dec", ["{F}/badzarr"]),
    ("decode-foreign-zarr", "decode {F}/foreignzarr --out {F}/dec", ["{F}/foreignzarr"]),
    ("decode-rows-reversed", "decode {F}/store.zarr --out {F}/dec --rows 5:2", ["--rows", "5:2"]),
    ("decode-rows-past-end", "decode {F}/store.zarr --out {F}/dec --rows 100:200", ["100:200"]),
    ("decode-unknown-split", "decode {F}/store.zarr --out {F}/dec --split nosuch", ["nosuch"]),
    ("decode-model-missing", "decode {F}/store.zarr --out {F}/dec --model {F}/missing", ["{F}/missing"]),
    ("decode-model-garbage-weights", "decode {F}/badstore.zarr --out {F}/dec --model {F}/badweights",
     ["{F}/badweights"]),
    ("decode-out-is-a-file", "decode {F}/store.zarr --out {F}/imgs.npy", ["{F}/imgs.npy"]),
    # -- bench
    ("bench-vae-budget-0", "bench vae --budget-s 0", ["--budget-s", "0"]),
    ("bench-vae-k-0", "bench vae --k 0", ["--k", "0"]),
    ("bench-vae-threads-0", "bench vae --threads 0", ["--threads", "0"]),
    ("bench-quantizers-steps-0", "bench quantizers --steps 0", ["--steps", "0"]),
    ("bench-quantizers-batch-size-0", "bench quantizers --batch-size 0", ["--batch-size", "0"]),
    ("bench-quantizers-warmup-neg", "bench quantizers --warmup -1", ["--warmup", "-1"]),
    ("bench-quantizers-lr-abc", "bench quantizers --lr abc", ["--lr", "abc"]),
    ("bench-stream-cpus-abc", "bench stream --cpus abc", ["--cpus", "abc"]),
    ("bench-stream-cpus-0", "bench stream --cpus 0", ["--cpus", "0"]),
    ("bench-stream-images-0", "bench stream --images 0", ["--images", "0"]),
    ("bench-tokenize-images-0", "bench tokenize --images 0", ["--images", "0"]),
    ("bench-tokenize-batch-size-0", "bench tokenize --batch-size 0", ["--batch-size", "0"]),
    ("bench-tokenize-actors-0", "bench tokenize --actors 0", ["--actors", "0"]),
    ("bench-tokenize-workdir-is-a-file", "bench tokenize --images 8 --workdir {F}/imgs.npy", ["{F}/imgs.npy"]),
    ("bench-train-steps-0", "bench train --steps 0", ["--steps", "0"]),
    ("bench-train-missing-config", "bench train --config {F}/missing.yaml", ["{F}/missing.yaml"]),
]

# Issue 27 point 4, class 1: every numeric option, and every numeric config key a user sets with --set,
# outside its real range. The message names the option (or key), the value and the range.
RANGES = [
    ("demo-prior-steps-0", "demo --root {F}/demo --prior-steps 0", ["--prior-steps", "must be >= 1", "got 0"]),
    ("shard-quality-0", "shard {F}/imgs.npy {F}/out --quality 0", ["--quality", "in [1, 100]", "got 0"]),
    ("shard-quality-101", "shard {F}/imgs.npy {F}/out --quality 101", ["--quality", "got 101"]),
    ("shard-maxcount-0", "shard {F}/imgs.npy {F}/out --maxcount 0", ["--maxcount", "must be >= 1", "got 0"]),
    ("shard-maxsize-0", "shard {F}/imgs.npy {F}/out --maxsize 0", ["--maxsize", "must be > 0", "got 0"]),
    ("shard-val-fraction-1", "shard {F}/imgs.npy {F}/out --val-fraction 1", ["--val-fraction", "in [0, 1)", "got 1"]),
    ("shard-workers-0", "shard {F}/imgs.npy {F}/out --workers 0", ["--workers", "must be >= 1", "got 0"]),
    ("train-lr-0", "train {TRAIN} --set optim.lr=0", ["optim.lr", "greater than 0", "got 0"]),
    ("train-lr-inf", "train {TRAIN} --set optim.lr=.inf", ["optim.lr", "finite number", "got inf"]),
    ("train-ema-decay-1", "train {TRAIN} --set optim.ema_decay=1", ["optim.ema_decay", "less than 1", "got 1"]),
    ("train-betas-out-of-range", "train {TRAIN} --set optim.betas=[0.9,1.5]", ["optim.betas.1", "less than 1"]),
    ("train-warmup-negative", "train {TRAIN} --set optim.warmup_steps=-5",
     ["optim.warmup_steps", "greater than or equal to 0", "got -5"]),
    ("train-codebook-size-0", "train {TRAIN} --set model.quantizer.codebook_size=0",
     ["model.quantizer.codebook_size", "greater than or equal to 1", "got 0"]),
    ("train-quantizer-decay-1.5", "train {TRAIN} --set model.quantizer.decay=1.5",
     ["model.quantizer.decay", "less than 1", "got 1.5"]),
    ("train-latent-dim-0", "train {TRAIN} --set model.latent_dim=0", ["model.latent_dim", "got 0"]),
    ("train-patience-0", "train {TRAIN} --set train.early_stop.patience=0", ["train.early_stop.patience", "got 0"]),
    ("train-cpus-per-worker-negative", "train {TRAIN} --set scaling.cpus_per_worker=-1",
     ["scaling.cpus_per_worker", "got -1"]),
    ("train-keep-checkpoints-0", "train {TRAIN} --set run.keep_checkpoints=0", ["run.keep_checkpoints", "got 0"]),
    ("train-shuffle-buffer-negative", "train {TRAIN} --set data.shuffle_buffer=-1", ["data.shuffle_buffer", "got -1"]),
    ("train-kl-ramp-ratio-2", "train {VAE} --set kl.ramp_ratio=2", ["kl.ramp_ratio", "less than or equal to 1", "got 2"]),
    ("train-vae-free-bits-negative", "train {VAE} --set model.free_bits=-1", ["model.free_bits", "got -1"]),
    ("train-vqgan-adversarial-weight-negative", "train {VQGAN} --set loss.adversarial_weight=-1",
     ["loss.adversarial_weight", "got -1"]),
    ("tokenize-size-0", "tokenize --model {F}/model --data {F}/shards --out {F}/t16.zarr --size 0",
     ["--size", "must be >= 1", "got 0"]),
    ("tokenize-gpus-negative", "tokenize --model {F}/model --data {F}/shards --out {F}/t17.zarr --gpus -1",
     ["--gpus", "got -1"]),
    ("tokenize-decode-threads-0", "tokenize --model {F}/model --data {F}/shards --out {F}/t18.zarr --decode-threads 0",
     ["--decode-threads", "got 0"]),
    ("train-prior-dropout-1", "train-prior {PRIOR} --set data.store={F}/store.zarr --set model.dropout=1",
     ["model.dropout", "less than 1", "got 1"]),
    ("train-prior-heads-0", "train-prior {PRIOR} --set data.store={F}/store.zarr --set model.heads=0",
     ["model.heads", "got 0"]),
    ("train-prior-sample-steps-0", "train-prior {MASKGIT} --set data.store={F}/store.zarr --set model.sample_steps=0",
     ["model.sample_steps", "got 0"]),
    ("train-prior-temperature-0", "train-prior {PRIOR} --set data.store={F}/store.zarr --set sample.temperature=0",
     ["sample.temperature", "greater than 0", "got 0"]),
    ("train-prior-cfg-negative", "train-prior {PRIOR} --set data.store={F}/store.zarr --set sample.cfg_scale=-1",
     ["sample.cfg_scale", "greater than or equal to 0", "got -1"]),
    ("train-prior-seed-negative", "train-prior {PRIOR} --set data.store={F}/store.zarr --set train.seed=-1",
     ["train.seed", "greater than or equal to 0", "got -1"]),
    ("train-prior-cache-mb-0", "train-prior {PRIOR} --set data.store={F}/store.zarr --set data.cache_mb=0",
     ["data.cache_mb", "got 0"]),
    ("retrain-usage-floor-2", "retrain {RETRAIN} --set promotion.usage_floor=2", ["promotion.usage_floor", "got 2"]),
    ("retrain-actors-0", "retrain {RETRAIN} --set retokenize.actors=0", ["retokenize.actors", "got 0"]),
    ("retrain-validation-batch-size-0", "retrain {RETRAIN} --set validation.batch_size=0",
     ["validation.batch_size", "got 0"]),
    ("retrain-lr-negative", "retrain {RETRAIN} --set optim.lr=-1", ["optim.lr", "got -1"]),
    ("decode-rows-empty", "decode {F}/store.zarr --out {F}/dec2 --rows 3:3", ["--rows", "3:3", "a < b"]),
    ("decode-rows-negative", "decode {F}/store.zarr --out {F}/dec2 --rows=-1:2", ["--rows", "-1:2"]),
    ("export-batch-size-0", "export {F}/store.zarr --format parquet {F}/e.parquet --batch-size 0",
     ["--batch-size", "must be >= 1", "got 0"]),
    ("export-num-classes-0", "export {F}/store.zarr --format parquet {F}/e.parquet --num-classes 0",
     ["--num-classes", "got 0"]),
    ("sample-top-p-0", "sample --prior {F}/missing --out {F}/s --top-p 0", ["--top-p", "in (0, 1]", "got 0"]),
    ("sample-top-p-1.5", "sample --prior {F}/missing --out {F}/s --top-p 1.5", ["--top-p", "in (0, 1]", "got 1.5"]),
    ("sample-temperature-0", "sample --prior {F}/missing --out {F}/s --temperature 0",
     ["--temperature", "must be > 0", "got 0"]),
    ("sample-temperature-inf", "sample --prior {F}/missing --out {F}/s --temperature inf",
     ["--temperature", "finite", "inf"]),
    ("sample-cfg-negative", "sample --prior {F}/missing --out {F}/s --cfg -1", ["--cfg", "must be >= 0", "got -1"]),
    ("sample-top-k-0", "sample --prior {F}/missing --out {F}/s --top-k 0", ["--top-k", "must be >= 1", "got 0"]),
    ("sample-n-0", "sample --prior {F}/missing --out {F}/s --n 0", ["--n", "got 0"]),
    ("sample-class-negative", "sample --prior {F}/missing --out {F}/s --class -1", ["--class", "got -1"]),
    ("sample-seed-negative", "sample --prior {F}/missing --out {F}/s --seed -1", ["--seed", "must be >= 0", "got -1"]),
    ("eval-batch-size-0", "eval --model {F}/model --data {F}/shards --out {F}/ev --batch-size 0",
     ["--batch-size", "got 0"]),
    ("bench-prior-dropout-1", "bench prior --dropout 1", ["--dropout", "in [0, 1)", "got 1"]),
    ("bench-prior-label-dropout-nan", "bench prior --label-dropout nan", ["--label-dropout", "finite", "nan"]),
    ("bench-prior-cfg-negative", "bench prior --cfg -2", ["--cfg", "must be >= 0", "got -2"]),
    ("bench-prior-families-speed-rows-0", "bench prior-families --speed-rows 1,0", ["--speed-rows", "got 0"]),
    ("bench-vqgan-disc-start-negative", "bench vqgan --disc-start -1", ["--disc-start", "got -1"]),
    ("bench-scale-rss-shards-negative", "bench scale --rss-shards -1", ["--rss-shards", "got -1"]),
    ("fid-stats-resolution-0", "fid-stats {F}/shards --out {F}/r.npz --resolution 0", ["--resolution", "got 0"]),
    ("fid-stats-limit-0", "fid-stats {F}/shards --out {F}/r.npz --limit 0", ["--limit", "got 0"]),
    ("fid-stats-batch-size-0", "fid-stats {F}/shards --out {F}/r.npz --batch-size 0", ["--batch-size", "got 0"]),
]

# Issue 27 point 4, class 2: every output path checked before work starts: a parent that is a file, an
# existing non-empty folder that the command did not write (fixture `texts`), a folder where a file goes.
# (No write permission cannot be shown to root, who writes anywhere: tests/unit/test_outputs.py checks it
# as an unprivileged user.)
OUTPUTS = [
    ("demo-root-parent-is-a-file", "demo --root {F}/imgs.npy/demo", ["{F}/imgs.npy/demo", "parent", "is a file"]),
    ("demo-root-foreign-folder", "demo --root {F}/texts", ["{F}/texts", "non-empty folder"]),
    ("shard-dest-parent-is-a-file", "shard {F}/imgs.npy {F}/imgs.npy/out", ["{F}/imgs.npy/out", "is a file"]),
    ("shard-dest-foreign-folder", "shard {F}/imgs.npy {F}/texts", ["DEST", "{F}/texts", "non-empty folder"]),
    ("inspect-json-parent-is-a-file", "inspect {F}/store.zarr --json {F}/imgs.npy/s.json",
     ["--json", "{F}/imgs.npy/s.json", "is a file"]),
    ("inspect-json-is-a-folder", "inspect {F}/store.zarr --json {F}/empty", ["--json", "{F}/empty is a folder"]),
    ("train-run-root-parent-is-a-file", "train {TRAIN} --set run.root={F}/imgs.npy/runs",
     ["run.root", "{F}/imgs.npy/runs", "is a file"]),
    ("train-run-folder-foreign", "train {TRAIN} --set run.root={F} --set run.name=texts",
     ["run.root/run.name", "{F}/texts", "non-empty folder"]),
    ("train-storage-path-parent-is-a-file", "train {TRAIN} --set run.root={F}/runs10 --set run.storage_path={F}/imgs.npy/ray",
     ["run.storage_path", "{F}/imgs.npy/ray", "is a file"]),
    ("train-json-parent-is-a-file", "train {TRAIN} --json {F}/imgs.npy/t.json", ["--json", "{F}/imgs.npy/t.json"]),
    ("tokenize-out-parent-is-a-file", "tokenize --model {F}/model --data {F}/shards --out {F}/imgs.npy/t.zarr",
     ["--out", "{F}/imgs.npy/t.zarr", "is a file"]),
    ("tokenize-out-foreign-folder", "tokenize --model {F}/model --data {F}/shards --out {F}/texts",
     ["--out", "{F}/texts", "non-empty folder"]),
    ("train-prior-run-root-parent-is-a-file", "train-prior {PRIOR} --set data.store={F}/store.zarr "
     "--set run.root={F}/imgs.npy/runs", ["run.root", "{F}/imgs.npy/runs", "is a file"]),
    ("train-prior-run-folder-foreign", "train-prior {PRIOR} --set data.store={F}/store.zarr --set run.root={F} "
     "--set run.name=texts", ["run.root/run.name", "{F}/texts", "non-empty folder"]),
    ("train-prior-item-log-parent-is-a-file", "train-prior {PRIOR} --set data.store={F}/store.zarr "
     "--set run.root={F}/runs11 --set data.item_log={F}/imgs.npy/items", ["data.item_log", "{F}/imgs.npy/items"]),
    ("retrain-run-root-parent-is-a-file", "retrain {RETRAIN} --set run.root={F}/imgs.npy/runs",
     ["run.root", "{F}/imgs.npy/runs", "is a file"]),
    ("retrain-out-prefix-parent-is-a-file", "retrain {RETRAIN} --set run.root={F}/runs12 "
     "--set retokenize.out_prefix={F}/imgs.npy/tokens", ["retokenize.out_prefix", "{F}/imgs.npy/tokens"]),
    ("decode-out-parent-is-a-file", "decode {F}/store.zarr --out {F}/imgs.npy/d", ["--out", "{F}/imgs.npy/d"]),
    ("decode-out-foreign-folder", "decode {F}/store.zarr --out {F}/texts", ["--out", "{F}/texts", "non-empty folder"]),
    ("export-out-parent-is-a-file", "export {F}/store.zarr --format parquet {F}/imgs.npy/e.parquet",
     ["OUT", "{F}/imgs.npy/e.parquet", "is a file"]),
    ("export-megatron-parent-is-a-file", "export {F}/store.zarr --format megatron {F}/imgs.npy/e",
     ["OUT", "{F}/imgs.npy/e.bin", "is a file"]),
    ("export-out-is-a-folder", "export {F}/store.zarr --format parquet {F}/empty", ["OUT", "{F}/empty is a folder"]),
    ("sample-out-parent-is-a-file", "sample --prior {F}/missing --out {F}/imgs.npy/s", ["--out", "{F}/imgs.npy/s"]),
    ("sample-out-foreign-folder", "sample --prior {F}/missing --out {F}/texts", ["--out", "{F}/texts", "non-empty"]),
    ("eval-out-parent-is-a-file", "eval --model {F}/model --data {F}/shards --out {F}/imgs.npy/e",
     ["--out", "{F}/imgs.npy/e"]),
    ("eval-out-foreign-folder", "eval --model {F}/model --data {F}/shards --out {F}/texts",
     ["--out", "{F}/texts", "non-empty folder"]),
    ("eval-json-parent-is-a-file", "eval --model {F}/model --data {F}/shards --out {F}/ev --json {F}/imgs.npy/e.json",
     ["--json", "{F}/imgs.npy/e.json"]),
    ("convert-out-parent-is-a-file", "convert taming:{F}/missing {F}/imgs.npy/c", ["out", "{F}/imgs.npy/c"]),
    ("convert-out-foreign-folder", "convert taming:{F}/missing {F}/texts", ["out", "{F}/texts", "non-empty"]),
    ("fid-stats-out-parent-is-a-file", "fid-stats {F}/shards --out {F}/imgs.npy/r.npz", ["--out", "{F}/imgs.npy/r.npz"]),
    ("fid-stats-out-is-a-folder", "fid-stats {F}/shards --out {F}/empty", ["--out", "{F}/empty is a folder"]),
    ("bench-prior-grid-parent-is-a-file", "bench prior --grid {F}/imgs.npy/g.png", ["--grid", "{F}/imgs.npy/g.png"]),
    ("bench-prior-families-grids-is-a-file", "bench prior-families --grids {F}/imgs.npy", ["--grids", "{F}/imgs.npy"]),
    ("bench-vae-json-parent-is-a-file", "bench vae --json {F}/imgs.npy/v.json", ["--json", "{F}/imgs.npy/v.json"]),
]
CASES += RANGES + OUTPUTS

# Good input on the same fixtures succeeds, so a refusal above is about the bad input alone.
CONTROLS = [
    ("decode-good-store", "decode {F}/store.zarr --out {F}/dec --rows 0:2"),
    ("inspect-good-store", "inspect {F}/store.zarr"),
    ("inspect-good-shards", "inspect {F}/shards --verify"),
]


def _save_tiny_vqvae(path: Path, image_size: int = 8):
    """An untrained VQ-VAE (image_size x image_size grey -> 2x2 codes of 16): config + weights."""
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=1, image_size=image_size, hidden=8, res_blocks=0, downsample=image_size // 2,
                         latent_dim=4, quantizer=QuantizerConfig(codebook_size=16))
    return save_model(VQVAE(config).eval(), path)


def _store_for(url: str, model: Path) -> None:
    """A finished token store (2x2 codes of 16) whose lineage names `model` and its weights."""
    import zarr

    build_store(url, [3, 2], ["train", "val"], codebook_size=16)
    group = zarr.open_group(url, mode="r+")
    sha = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    group.attrs["lineage"] = {**group.attrs["lineage"], "model_uri": str(model), "weights_sha256": sha,
                              "token_shape": [[2, 2]], "codebook_size": 16}


def _build_fixtures(root: Path) -> None:
    import zarr

    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    model = _save_tiny_vqvae(root / "model")
    for name in ("empty", "texts", "badmanifest", "badtar", "badzarr", "versions/v1"):
        (root / name).mkdir(parents=True)
    (root / "texts" / "a.txt").write_text("not an image\n")
    (root / "texts" / "a.npy").write_text("not a numpy file\n")
    (root / "badmanifest" / "manifest.json").write_text("{not json")
    (root / "badtar" / "train-000000.tar").write_bytes(b"not a tar archive " * 64)
    (root / "badzarr" / "zarr.json").write_text("{not json")
    zarr.create_group(str(root / "foreignzarr"), zarr_format=3).create_array("x", shape=(3,), dtype="int64")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    _save_tiny_vqvae(root / "badweights")
    (root / "badweights" / "model.safetensors").write_bytes(b"garbage " * 32)
    _save_tiny_vqvae(root / "badconfig")
    (root / "badconfig" / "config.json").write_text("{not json")
    np.save(root / "imgs.npy", np.zeros((10, 8, 8), np.uint8))
    settings = ShardSettings(maxcount=5, val_fraction=0.3)
    write_shards(str(root / "imgs.npy"), str(root / "shards"), settings, progress=False)
    write_shards(str(root / "imgs.npy"), str(root / "versions" / "v1"), settings, progress=False)
    _store_for(str(root / "store.zarr"), model)
    _store_for(str(root / "badstore.zarr"), root / "badweights")


def _run_batch(cases: list[tuple[str, list[str]]], cwd: Path, env: dict[str, str], out: Path) -> dict[str, Any]:
    """The cases in one fresh `python -m jobs`-like process (helpers/cli_batch.py): by case id,
    each one's exit code and what it wrote to stdout and stderr."""
    (cwd / f"{out.stem}.in.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-m", "helpers.cli_batch", str(cwd / f"{out.stem}.in.json"), str(out)],
                   cwd=cwd, env=env, check=True, timeout=900)
    runs = json.loads(out.read_text()).values()
    for run in runs:
        run.pop("seconds")  # each case's time in the batch (a refusal takes ~0.1 s; the first pays the imports)
    return {case: subprocess.CompletedProcess(argv, **run) for (case, argv), run in zip(cases, runs)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's result, by case id: two processes (one a core), each running half of the
    cases one after the other as `python -m jobs` would (helpers/cli_batch.py)."""
    root = tmp_path_factory.mktemp("bad-input")
    fixtures = root / "f"
    _build_fixtures(fixtures)
    ray_tmp = root / "ray"
    ray_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), RAY_TMPDIR=str(ray_tmp),
               TQDM_DISABLE="1")
    names = {"F": str(fixtures), "TRAIN": TRAIN, "RETRAIN": RETRAIN, "VAR_PRIOR": VAR_PRIOR, "PRIOR": PRIOR,
             "MASKGIT": MASKGIT, "VAE": VAE, "VQGAN": VQGAN}
    work = root / "cwd"  # anything a job writes to a relative default path lands here
    work.mkdir()
    cases = [(case, command.format(**names).split()) for case, command, *_ in CASES + CONTROLS]
    before = _tree(fixtures)
    with ThreadPoolExecutor(max_workers=2) as pool:
        halves = [pool.submit(_run_batch, cases[i::2], work, env, root / f"results-{i}.json") for i in range(2)]
        done = {case: run for half in halves for case, run in half.result().items()}
    return {"runs": done, "names": names, "ray_tmp": ray_tmp, "written": _tree(fixtures) - before,
            "cwd": sorted(p.name for p in work.iterdir() if not p.name.startswith("results-"))}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _message(stderr: str) -> list[str]:
    """stderr without argparse's usage block (lines before `tokenmill ...: error:`) and without
    progress bars (a folder of shards is scanned before it is found unreadable)."""
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    if lines and lines[0].startswith("usage:"):
        first = next((i for i, line in enumerate(lines) if line.startswith("tokenmill")), len(lines))
        lines = lines[first:]
    return lines


@pytest.mark.parametrize("case, command, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_message_naming_it_and_exit_2(results, case, command, expected):
    run = results["runs"][case]
    shown = f"$ tokenmill {command}\nrc={run.returncode}\nstdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert "Traceback" not in run.stdout + run.stderr, shown
    assert run.returncode == 2, shown
    lines = _message(run.stderr)
    assert lines and lines[0].startswith("tokenmill ") and ": error: " in lines[0], shown
    # One message: its first line, then only indented detail lines (a config error lists its keys).
    assert all(line.startswith("  ") for line in lines[1:]), shown
    message = "\n".join(lines)
    for text in expected:
        assert text.format(**results["names"]) in message, shown


def test_no_bad_input_started_ray(results):
    """Every refusal came before Ray: no Ray session was created under the jobs' RAY_TMPDIR."""
    assert not list(results["ray_tmp"].rglob("session_*")), sorted(p.name for p in results["ray_tmp"].iterdir())


def test_no_bad_input_wrote_anything(results):
    """Nothing but the controls' decoded grids (dec/) appeared among the fixtures, and nothing in the
    working directory but the batch files: every refusal came before the first write."""
    assert sorted(p for p in results["written"] if p != "dec" and not p.startswith("dec/")) == [], results["written"]
    assert [name for name in results["cwd"] if not name.endswith(".in.json")] == []


@pytest.mark.parametrize("case, command", CONTROLS, ids=[c[0] for c in CONTROLS])
def test_good_input_on_the_same_fixtures_succeeds(results, case, command):
    run = results["runs"][case]
    assert run.returncode == 0, f"$ tokenmill {command}\nrc={run.returncode}\nstderr:\n{run.stderr[-4000:]}"
