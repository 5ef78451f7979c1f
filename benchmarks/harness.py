"""What the benchmarks measure alike: peak memory of a run, the tokenizer they encode with, and an
S3 server on loopback for benchmarks of remote stores.

`PeakRSS` samples every 0.2 s, in a thread, the RSS of this process, of the Ray worker
processes under it (a local Ray instance is this process's child) and of each Ray Data
actor that encodes: the numbers that show whether memory grows with the size of a run.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator


def _is_ray_worker(proc) -> bool:
    return proc.name().startswith("ray::")


def _is_encoder(proc) -> bool:
    """A Ray Data actor process of the tokenize job (idle Ray workers become actors in place)."""
    return "MapWorker" in proc.name() or "ShardEncoder" in " ".join(proc.cmdline()[:1])


class PeakRSS:
    """Peak RSS (MiB): `driver_mb` (this process), `total_mb` (this process and its Ray workers,
    summed) and `actors_mb()` (each encoding actor started during the run)."""

    def __enter__(self) -> "PeakRSS":
        import psutil

        self.driver_mb, self.total_mb, self._actors, self._stop = 0.0, 0.0, {}, threading.Event()
        self._me = psutil.Process()
        self._before = {p.pid for p in self._me.children(recursive=True)}  # an earlier run's, exiting
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                driver, children = self._me.memory_info().rss, self._me.children(recursive=True)
            except psutil.Error:
                driver, children = 0, []
            total = driver
            for proc in children:
                try:
                    if not _is_ray_worker(proc) and not _is_encoder(proc):
                        continue
                    rss = proc.memory_info().rss
                    total += rss
                    if proc.pid not in self._before and _is_encoder(proc):
                        self._actors[proc.pid] = max(self._actors.get(proc.pid, 0.0), rss / 2**20)
                except psutil.Error:
                    pass
            self.driver_mb, self.total_mb = max(self.driver_mb, driver / 2**20), max(self.total_mb, total / 2**20)
            self._stop.wait(0.2)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def actors_mb(self) -> dict[int, float]:
        return dict(self._actors)


@contextlib.contextmanager
def loopback_s3() -> Iterator[dict[str, Any]]:
    """moto's S3 server on a free 127.0.0.1 port, as tests/conftest.py starts it; yields the
    fsspec storage options of s3fs for it. Every request is real HTTP through botocore."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request on stderr

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    finally:
        server.stop()


def make_bench_tokenizer(path: Path) -> Path:
    """A CIFAR-sized VQ-VAE tokenizer: 32x32 RGB -> 8x8 codes from 512 entries, untrained (speed
    does not depend on training) but k-means initialised, so codes are in use as after training."""
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=3, image_size=32, hidden=64, res_blocks=2, downsample=4, latent_dim=64,
                              quantizer=QuantizerConfig(codebook_size=512)))
    model.train()(torch.rand(512, 3, 32, 32))
    return save_model(model.eval(), path)
