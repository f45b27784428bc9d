"""Benchmarks of bpfailover on the network-namespace lab (method: bench/NOTES.md).

`python -m bench.run [--quick] [--only NAME]` runs them; each writes
`bench/results/<name>.json` (with the machine it ran on) and, where useful, a PNG;
`bench/results/summary.md` and `README-performance.md` are generated from the JSON.
Every number that matters is a ratio against a baseline measured in the same run.
"""
