"""The GPU check: the figures a first lent GPU node must give, each against a threshold, in at
most 8 minutes on one H100 (`bash scripts/gpu_check.sh [OUT]`; `--dry-run`: the same phases at
toy sizes on the CPU, thresholds not enforced, for CI).

Phases, their hard time limit on one H100 (a phase past it is killed and counted as failed),
and the exit-code bit set when the phase fails (crashed, timed out, or a threshold missed):

| phase | limit | bit | measures (threshold) |
| --- | --- | --- | --- |
| setup | 40 s | 1 | 4,096 photo-like 256-px JPEGs in 16 shards; an untrained f16 VQGAN tokenizer saved |
| vqgan | 75 s | 2 | VQGAN step at 256 px (engine StepRunner, adversarial task): fp32 vs bf16 step time (bf16 ≥ 1.3× faster) and peak memory (bf16 ≤ 0.9× fp32) |
| syncs | 40 s | 4 | host-device syncs per bf16 VQGAN step under `torch.cuda.set_sync_debug_mode("warn")` (≤ 1) |
| stream | 90 s | 8 | the Ray training stream's img/s (a whole pass, read as a rank reads it) vs the bf16 step's img/s on device-resident batches (≥ 1: the GPU can be fed); the step fed by the stream for 128 steps (≥ 0.9 of the step alone); GPU utilisation from `nvidia-smi` meanwhile (≥ 80 %) |
| tokenize | 90 s | 16 | `tokenize_dataset` bf16 steady img/s per GPU vs the bf16 encoder alone on uint8 channels_last device batches (≥ 0.8) |
| prior | 45 s | 32 | the prior's training tokens/s, bf16 vs fp32 (TF32) (≥ 1.3×) |
| checkpoint | 45 s | 64 | train state saved and resumed on CUDA, deterministic kernels: restored tensors identical, and the next steps' losses and weights identical up to twice the kernels' own noise (two resumed runs compared; 0 when every kernel is deterministic) |
| nccl | 45 s | 128 | two ranks over NCCL: codebook buffers and discriminator weights identical (0); "n/a: one GPU" otherwise |

Total of the limits: 470 s (≤ 8 min); the driver's own work (reading results, the table) is
seconds. Each limit includes the phase process's start (imports, CUDA context, Ray where used:
~10-15 s); the estimated work itself is a third to a half of each limit. A dry run gets
`DRY_RUN_FACTOR` times every limit (a shared 2-core CI machine mostly pays imports). Every phase runs in its own process (`--in-process` for tests): a CUDA error or a hang
costs that phase only, and each phase's peak memory is its own. Results: `OUT/gpu_check.json`
(one JSON, schema `SCHEMA`, checked by `check_report`) and `OUT/gpu_table.md` rendered from it;
phase logs in `OUT/logs/`. Exit code: 0 when every enforced threshold holds and every phase
ran; else the OR of the failed phases' bits (the JSON's `failed` names them); 2 when no CUDA
device is visible outside a dry run; 1 also when the driver itself fails (a report off its schema).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from tokenmill.benchmarks import gpu_phases as phases
from tokenmill.benchmarks.gpu_phases import Sizes

SCHEMA = "tokenmill.gpu_check/1"
TOTAL_BUDGET_S = 480
DRY_RUN_FACTOR = 3  # the limits are the GPU run's; toy sizes on 2 shared CPU cores mostly pay imports

GPU = Sizes(
    device="cuda", px=256, images=4096, photos=512, per_shard=256, batch=16, warmup=5, steps=20,
    # taming's f16 VQGAN at 256 px (16x16 tokens), LlamaGen's 16,384 8-dim codes (dead codes likely)
    vqgan={"base_channels": 128, "channel_mult": [1, 1, 2, 2, 4], "res_blocks": 2, "attention": True,
           "latent_dim": 64, "quantizer": {"kind": "vq", "codebook_size": 16384, "codebook_dim": 8, "cosine": True,
                                           "ema": True, "decay": 0.99, "dead_code_threshold": 1.0}},
    discriminator={"channels": 64, "layers": 3},
    tokenize_batch=256, limit_images=8192,
    prior={"codebook_size": 16384, "num_classes": 1000, "grid": [[16, 16]], "dim": 768, "depth": 12, "heads": 12},
    prior_batch=64, resume_steps=3, fed_batches=128,  # 128 fed steps: a steady rate, ~15 s
)
DRY_RUN = Sizes(
    device="cpu", px=16, images=24, photos=6, per_shard=12, batch=4, warmup=1, steps=1,
    vqgan={"base_channels": 8, "channel_mult": [1, 2, 2], "res_blocks": 1, "attention": False, "latent_dim": 8,
           "quantizer": {"kind": "vq", "codebook_size": 32, "kmeans_iters": 2, "dead_code_threshold": 1.0}},
    discriminator={"channels": 8, "layers": 2},
    tokenize_batch=8, limit_images=8,
    prior={"codebook_size": 32, "num_classes": 10, "grid": [[4, 4]], "dim": 32, "depth": 1, "heads": 2},
    prior_batch=4, resume_steps=1,
)


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    budget_s: int
    bit: int
    run: Callable[[Sizes, Path, dict[str, Any]], dict[str, Any]]  # (sizes, its folder, setup's figures)

    def limit_s(self, dry_run: bool) -> int:
        """The hard limit: `budget_s` on the GPU; a loaded 2-core CI machine gets DRY_RUN_FACTOR times it."""
        return self.budget_s * (DRY_RUN_FACTOR if dry_run else 1)


PHASES = [
    Phase("setup", 40, 1, lambda sizes, folder, _: phases.make_inputs(sizes, folder)),
    Phase("vqgan", 75, 2, lambda sizes, folder, _: phases.vqgan_precisions(sizes, folder)),
    Phase("syncs", 40, 4, lambda sizes, folder, _: phases.host_syncs(sizes, folder)),
    Phase("stream", 90, 8, phases.stream_vs_step),
    Phase("tokenize", 90, 16, phases.tokenize_vs_limit),
    Phase("prior", 45, 32, lambda sizes, folder, _: phases.prior_precisions(sizes, folder)),
    Phase("checkpoint", 45, 64, lambda sizes, folder, _: phases.checkpoint_resume(sizes, folder)),
    Phase("nccl", 45, 128, lambda sizes, folder, _: phases.nccl_identity(sizes, folder)),
]
BY_NAME = {phase.name: phase for phase in PHASES}
assert sum(phase.budget_s for phase in PHASES) <= TOTAL_BUDGET_S


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    phase: str
    key: str  # the phase's figure compared with the threshold
    op: str  # ">=" or "<="
    threshold: float
    label: str
    details: tuple[tuple[str, str], ...] = ()  # (label, figure) shown beside it in the table


CHECKS = [
    Check("vqgan_bf16_speedup", "vqgan", "bf16_speedup", ">=", 1.3, "VQGAN 256 px step: fp32 time / bf16 time",
          (("px", "px"), ("batch", "batch"), ("fp32 ms", "fp32_step_ms"), ("bf16 ms", "bf16_step_ms"),
           ("bf16 img/s", "bf16_img_s"))),
    Check("vqgan_bf16_memory", "vqgan", "bf16_memory_ratio", "<=", 0.9, "VQGAN 256 px step: bf16 / fp32 peak memory",
          (("fp32 GiB", "fp32_peak_gib"), ("bf16 GiB", "bf16_peak_gib"))),
    Check("syncs_per_step", "syncs", "syncs_per_step", "<=", 1, "host-device syncs per bf16 VQGAN step"),
    Check("stream_over_step", "stream", "stream_over_step", ">=", 1.0,
          "Ray training stream img/s / bf16 step img/s (256 px JPEGs)",
          (("stream img/s", "stream_img_s"), ("step img/s", "step_img_s"), ("host peak GiB", "host_peak_rss_gib"))),
    Check("fed_over_step", "stream", "fed_over_step", ">=", 0.9, "step fed by the stream / step alone",
          (("fed img/s", "fed_img_s"),)),
    Check("gpu_utilisation", "stream", "gpu_util_pct", ">=", 80, "GPU utilisation while fed (nvidia-smi, %)"),
    Check("tokenize_over_limit", "tokenize", "per_gpu_over_limit", ">=", 0.8,
          "tokenize img/s per GPU / bf16 encoder limit (uint8, channels_last)",
          (("per GPU img/s", "per_gpu_img_s"), ("limit img/s", "limit_img_s"), ("GPUs", "gpus"),
           ("actor peak GiB", "actor_peak_rss_gib"))),
    Check("prior_bf16_speedup", "prior", "bf16_speedup", ">=", 1.3, "prior training tokens/s: bf16 / fp32",
          (("fp32 tok/s", "fp32_tokens_s"), ("bf16 tok/s", "bf16_tokens_s"))),
    Check("resume_identical", "checkpoint", "max_diff", "<=", 0.0,
          "checkpoint save + resume on CUDA: max difference (restored; continued beyond 2x the kernels' noise)",
          (("restored", "restored_max_diff"), ("continued", "continued_max_diff"), ("noise", "floor_max_diff"))),
    Check("nccl_identical", "nccl", "max_diff", "<=", 0.0,
          "2 GPUs, NCCL: codebook buffers + discriminator weights, max difference between ranks"),
]
STATUSES = {"pass", "fail", "n/a", "not enforced", "error"}


# -- running phases -------------------------------------------------------------------------------------

class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int, name: str) -> Iterator[None]:
    """In process: SIGALRM interrupts the phase after `seconds` (main thread only). A timer set
    before (pytest-timeout's) is put back with what is left of it."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise PhaseTimeout(f"{name} ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def run_phase_here(phase: Phase, sizes: Sizes, work: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """{"figures": ...} or {"error": traceback} of one phase in this process, time-boxed."""
    folder = work / phase.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with deadline(phase.limit_s(sizes.device == "cpu"), phase.name):
            return {"figures": phase.run(sizes, folder, inputs)}
    except PhaseTimeout as err:
        return {"error": str(err), "timeout": True}
    except Exception:  # noqa: BLE001 - the report names it; the other phases still run
        return {"error": traceback.format_exc(limit=8)}


def run_phase_isolated(phase: Phase, dry_run: bool, work: Path, logs: Path) -> dict[str, Any]:
    """The phase in a child process (`--phase`), killed with its process group past its limit."""
    result = work / f"{phase.name}.result.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "tokenmill.benchmarks.gpu_check", "--phase", phase.name, "--work", str(work)]
    command += ["--dry-run"] if dry_run else []
    with open(logs / f"{phase.name}.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=phase.limit_s(dry_run))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # its own group: Ray, spawned ranks and nvidia-smi go too
            child.wait()
            return {"error": f"{phase.name} ran past its {phase.limit_s(dry_run)} s limit", "timeout": True}
    if not result.exists():
        return {"error": f"{phase.name} exited with {child.returncode} without a result; see {logs / phase.name}.log"}
    return json.loads(result.read_text())


def child_main(name: str, work: Path, dry_run: bool) -> int:
    """`--phase NAME`: run one phase here and write `WORK/NAME.result.json`."""
    sizes = DRY_RUN if dry_run else GPU
    outcome = run_phase_here(BY_NAME[name], sizes, work, _inputs(work))
    (work / f"{name}.result.json").write_text(json.dumps(outcome, default=str))
    return 0


def _inputs(work: Path) -> dict[str, Any]:
    path = work / "setup.result.json"
    return json.loads(path.read_text()).get("figures") or {} if path.exists() else {}


# -- the report -----------------------------------------------------------------------------------------

def evaluate(check: Check, phase: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """One check's row: its value and status (pass, fail, n/a, not enforced, error)."""
    row = {"name": check.name, "phase": check.phase, "label": check.label, "op": check.op,
           "threshold": check.threshold, "value": None}
    if phase["status"] == "skipped":  # left out with --phases: says so, fails nothing
        return row | {"status": "n/a", "value": "n/a: phase not run (--phases)"}
    if phase["status"] != "ok":
        return row | {"status": "error"}
    value = phase["figures"].get(check.key)
    row["value"] = value
    if isinstance(value, str):  # "n/a: one GPU", "n/a: CPU dry run"
        return row | {"status": "n/a"}
    if not isinstance(value, (int, float)):
        return row | {"status": "error", "value": None}
    if dry_run:
        return row | {"status": "not enforced"}
    met = value >= check.threshold if check.op == ">=" else value <= check.threshold
    return row | {"status": "pass" if met else "fail"}


def build_report(outcomes: dict[str, dict[str, Any]], seconds: dict[str, float], dry_run: bool,
                 started: float) -> dict[str, Any]:
    """The one JSON: environment, every phase (status, time, limit, figures), every check, and
    the exit code with the names of what failed."""
    report_phases = {}
    for phase in PHASES:
        outcome = outcomes.get(phase.name, {"error": "not run (--phases)", "skipped": True})
        status = "ok" if "figures" in outcome else "skipped" if outcome.get("skipped") else \
            "timeout" if outcome.get("timeout") else "error"
        report_phases[phase.name] = {"status": status, "seconds": round(seconds.get(phase.name, 0.0), 2),
                                     "budget_s": phase.budget_s, "limit_s": phase.limit_s(dry_run), "bit": phase.bit,
                                     "error": outcome.get("error"), "figures": outcome.get("figures", {})}
    checks = [evaluate(check, report_phases[check.phase], dry_run) for check in CHECKS]
    failed_phases = {name for name, p in report_phases.items() if p["status"] in ("error", "timeout")}
    failed_phases |= {c["phase"] for c in checks if c["status"] == "fail"}
    return {
        "schema": SCHEMA, "dry_run": dry_run, "environment": environment(dry_run),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1), "budget_s": TOTAL_BUDGET_S,
        "phases": report_phases, "checks": checks,
        "failed": sorted(failed_phases, key=list(BY_NAME).index) +
                  [c["name"] for c in checks if c["status"] in ("fail", "error")],
        "exit_code": sum(BY_NAME[name].bit for name in failed_phases),
    }


def environment(dry_run: bool) -> dict[str, Any]:
    import torch

    gpu = "none: CPU dry run" if dry_run else _nvidia_smi("name,memory.total,driver_version")
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    return f"{len(out)} x {out[0]}" if out else "unknown"


def check_report(report: dict[str, Any]) -> None:
    """Raise ValueError listing every way `report` departs from the schema (CI runs it on the dry run)."""
    problems = []
    for key, kind in (("schema", str), ("dry_run", bool), ("environment", dict), ("started", str),
                      ("seconds", (int, float)), ("phases", dict), ("checks", list), ("failed", list),
                      ("exit_code", int)):
        if not isinstance(report.get(key), kind):
            problems.append(f"{key}: missing or not {kind}")
    if report.get("schema") != SCHEMA:
        problems.append(f"schema {report.get('schema')!r} != {SCHEMA!r}")
    phases_found = report.get("phases") or {}
    if list(phases_found) != list(BY_NAME):
        problems.append(f"phases {list(phases_found)} != {list(BY_NAME)}")
    for name, phase in phases_found.items():
        if phase.get("status") not in ("ok", "error", "timeout", "skipped") or not isinstance(phase.get("figures"), dict):
            problems.append(f"phase {name}: bad status or figures")
    rows = report.get("checks") or []
    if [row.get("name") for row in rows] != [check.name for check in CHECKS]:
        problems.append("checks: not the CHECKS in order")
    for row in rows:
        value = row.get("value")
        if row.get("status") not in STATUSES or not (value is None or isinstance(value, (int, float, str))):
            problems.append(f"check {row.get('name')}: bad status {row.get('status')!r} or value {value!r}")
        if row.get("status") in ("pass", "fail", "not enforced") and not isinstance(value, (int, float)):
            problems.append(f"check {row.get('name')}: {row.get('status')} without a number")
    if problems:
        raise ValueError("gpu_check report: " + "; ".join(problems))


def render_table(report: dict[str, Any]) -> str:
    """The GPU results table (markdown) from the report: one row per check."""
    env = report["environment"]
    lines = [f"GPU: {env['gpu']} · torch {env['torch']} (CUDA {env['cuda']}) · {report['started']} · "
             f"{report['seconds']:.0f} s of {report['budget_s']} s" + (" · DRY RUN on the CPU: not GPU numbers"
                                                                        if report["dry_run"] else ""),
             "", "| check | value | threshold | result | details |", "| --- | --- | --- | --- | --- |"]
    for check, row in zip(CHECKS, report["checks"]):
        figures = report["phases"][check.phase]["figures"]
        details = ", ".join(f"{label} {fmt(figures.get(key))}" for label, key in check.details)
        lines.append(f"| {check.label} | {fmt(row['value'])} | {check.op} {fmt(check.threshold)} | "
                     f"{row['status']} | {details} |")
    lines += ["", "| phase | status | seconds | limit s |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.1f} | {p['limit_s']} |" for name, p in report["phases"].items()]
    return "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# -- entry point ----------------------------------------------------------------------------------------

def run_check(out: Path, dry_run: bool, isolate: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Every phase (or `only`) in order; writes OUT/gpu_check.json and OUT/gpu_table.md; the report."""
    sizes = DRY_RUN if dry_run else GPU
    work, logs = out / "work", out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    started, outcomes, seconds = time.time(), {}, {}
    for phase in PHASES:
        if only and phase.name not in only and phase.name != "setup":
            continue
        print(f"== {phase.name} (limit {phase.limit_s(dry_run)} s)", file=sys.stderr, flush=True)
        begun = time.perf_counter()
        if isolate:
            outcomes[phase.name] = run_phase_isolated(phase, dry_run, work, logs)
        else:
            outcomes[phase.name] = run_phase_here(phase, sizes, work, _inputs(work))
            (work / f"{phase.name}.result.json").write_text(json.dumps(outcomes[phase.name], default=str))
        seconds[phase.name] = time.perf_counter() - begun
        print(f"   {phase.name}: {'ok' if 'figures' in outcomes[phase.name] else outcomes[phase.name]['error']} "
              f"({seconds[phase.name]:.1f} s)", file=sys.stderr, flush=True)
    report = build_report(outcomes, seconds, dry_run, started)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    check_report(report)  # after writing: a malformed report is still there to read
    (out / "gpu_table.md").write_text(render_table(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="results folder (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU; thresholds not enforced")
    parser.add_argument("--in-process", action="store_true", help="run the phases in this process (tests)")
    parser.add_argument("--phases", type=lambda s: s.split(","), default=None, help="only these (setup always runs)")
    parser.add_argument("--phase", choices=list(BY_NAME), help=argparse.SUPPRESS)  # a child process's one phase
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return child_main(args.phase, args.work, args.dry_run)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: this torch sees no CUDA device; run it on a GPU node with a CUDA build of torch "
              "(or --dry-run)", file=sys.stderr)
        return 2
    report = run_check(args.out, args.dry_run, isolate=not args.in_process, only=args.phases)
    print(render_table(report))
    if report["failed"]:
        print(f"gpu_check: failed: {', '.join(report['failed'])} (exit code {report['exit_code']})", file=sys.stderr)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
