"""What the benchmark scripts share: resumable result cells, provenance, models and data, statistics, GLUE tasks.

The scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and they import `toolkit.<module>`.
No script imports another script: what two of them need lives here, or in `optimum_oats` when the library needs it.

`cells` and `provenance` import only the standard library at module level, and `optimum_oats` only inside the
functions that need it: `peer_llmcompressor.py` uses them from an environment without the package's dependencies.
"""
