"""Benchmarks: each prints ratios against a baseline measured in the same run (`tokenmill bench NAME`).

One module per benchmark, each with `register(subparsers)` (its `tokenmill bench` options) and
`run(args)`; `jobs/bench.py` only dispatches. Shared by them: `harness` (peak-RSS sampling, the
bench tokenizer) and `peers` (other projects' implementations behind our interfaces).
"""
