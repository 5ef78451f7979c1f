"""Builders and constants shared by the tests; `from helpers.tokens import ...` works in every test
folder because tests/conftest.py puts tests/ on sys.path.

    engine       in-process runs of the training engine, tiny shards and stores for it
    tokens       tiny tokenizers (VQ-VAE, VAE, HVAE), small uneven shards, token stores, tokenize inputs
    shards       hand-made tars and PNGs: class-folder shards, a dirty shard
    jobs         digits shards, the misspelt-config check, Ray job submission
    diffusers    tiny diffusers autoencoders and RGB shards
    lpips        random LPIPS weights in the published formats, the VGG16 stand-in
    credentials  fake storage credentials and the leak check
    threads      one torch thread for tiny loops on a loaded machine
    syncs        host reads of tensors (GPU syncs) counted on the CPU, with the line that made each
    net          free ports
    multinode    a several-node Ray cluster, run as a script by tests/system/test_multinode.py
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
