"""What evaluation results look like: `{task: {metric: value, ...}}`, and which keys of a task are not metrics."""

# Keys lm-eval and this package's perplexity put beside a task's metrics (sizes, names, settings), never metrics.
NON_METRICS = frozenset({"alias", "name", "sample_len", "samples", "n_samples", "seqlen", "max_windows", "limit"})
