"""benchmarks/frontier.py: the peer's and the project's stored results become one table of perplexity against bits.

The JSONs are written by the test with made-up numbers, in the layouts of benchmarks/peer_llmcompressor.py and
benchmarks/quality.py; what is checked is the bits of unquantized cells, the seed pairing and the intervals.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from scipy.stats import t as student_t

pytestmark = pytest.mark.slow  # reads benchmarks/ scripts (tests/test_markers.py)


frontier = importlib.import_module("frontier")  # benchmarks/ is on sys.path (tests/benchmarks/conftest.py)


def write(folder: Path, name: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record))


def peer(folder: Path, cell: str, seed: int, perplexity: float, bits_per_weight: float, **scheme) -> None:
    write(
        folder,
        f"{cell}-s{seed}",
        {"cell": cell, "seed": seed, "perplexity": perplexity, "bits_per_weight": bits_per_weight, "scheme": scheme},
    )


def project(folder: Path, key: str, perplexity: float, **fields) -> None:
    write(folder, key, {"perplexity": perplexity, "seconds": 1.0, "mean_relative_error": 0.2, **fields})


@pytest.fixture
def folders(tmp_path):
    peers, ours = tmp_path / "peer", tmp_path / "quality"
    write(peers, "dense", {"cell": "dense", "perplexity": 22.88})
    for seed, ppl in enumerate((33.0, 34.0, 33.5)):
        peer(peers, "gptq-w4a16-g64", seed, ppl, 4.25, kind="gptq", bits=4)
    peer(peers, "gptq-w3a16-g64", 0, 115.0, 3.25, kind="gptq", bits=3)
    write(ours, "dense", {"perplexity": 22.88, "seconds": 0.0})
    # hassle at rho 0.4, seeds 0-2, unquantized: bits from the kept fraction.
    for seed, ppl in enumerate((28.0, 29.0, 28.5)):
        suffix = f"-s{seed}" if seed else ""
        project(ours, f"hassle-uniform-0.4-fast-k0.1-h2-lam0.2{suffix}", ppl, kept_fraction=0.6)
    # A quantized cell that states its own bits, on seeds 0 and 5 (only seed 0 shared with the reference).
    project(ours, "hassle-uniform-0.5-fast-k0.1-h2-q4", 30.0, kept_fraction=0.5, bits_per_weight=3.8, value_bits=4)
    project(ours, "hassle-uniform-0.5-fast-k0.1-h2-q4-s5", 31.0, kept_fraction=0.5, bits_per_weight=3.8, value_bits=4)
    return peers, ours


def test_unquantized_bits_count_bf16_values_and_factors_and_a_one_bit_mask():
    # (16 nnz + 1 * mn + 16 r (m + n)) / mn with nnz + r (m + n) = kept * mn
    rows, cols, rank, nnz = 576, 1536, 16, 300_000
    kept = (nnz + rank * (rows + cols)) / (rows * cols)
    assert frontier.unquantized_bits(kept) == pytest.approx(
        (16 * nnz + rows * cols + 16 * rank * (rows + cols)) / (rows * cols)
    )
    assert frontier.unquantized_bits(0.5) == 9.0


def test_rows_group_seeds_and_take_stored_bits_when_present(folders):
    peers, ours = folders
    rows = {row.label: row for row in frontier.collect([peers], [ours])}
    assert rows["dense"].bits_per_weight == 16.0 and rows["dense"].perplexity == {0: 22.88}
    hassle = rows["hassle 0.4 (fast-k0.1-h2-lam0.2)"]
    assert hassle.perplexity == {0: 28.0, 1: 29.0, 2: 28.5}
    assert hassle.bits_per_weight == pytest.approx(16 * 0.6 + 1)
    assert hassle.value_bits == 16 and hassle.rate == 0.4
    quantized = rows["hassle 0.5 (fast-k0.1-h2-q4) q4"]
    assert quantized.bits_per_weight == 3.8 and sorted(quantized.perplexity) == [0, 5]
    reference = rows["llm-compressor gptq-w4a16-g64"]
    assert reference.value_bits == 4 and reference.rate is None
    assert reference.mean == pytest.approx(math.exp(sum(math.log(p) for p in (33.0, 34.0, 33.5)) / 3))


def test_the_interval_is_paired_with_gptq_w4_where_seeds_match_and_plain_otherwise(folders):
    peers, ours = folders
    rows = {row.label: row for row in frontier.collect([peers], [ours])}
    reference = rows["llm-compressor gptq-w4a16-g64"]

    logs = [math.log(a / b) for a, b in zip((28.0, 29.0, 28.5), (33.0, 34.0, 33.5), strict=True)]
    mean = sum(logs) / 3
    half = student_t.ppf(0.975, 2) * math.sqrt(sum((x - mean) ** 2 for x in logs) / 2) / math.sqrt(3)
    expected = f"ratio {math.exp(mean):.3f} [{math.exp(mean - half):.3f}, {math.exp(mean + half):.3f}] paired, 3 seeds"
    assert frontier.interval(rows["hassle 0.4 (fast-k0.1-h2-lam0.2)"], reference) == expected

    # One shared seed cannot be paired: the plain interval of the two perplexities instead.
    plain = frontier.interval(rows["hassle 0.5 (fast-k0.1-h2-q4) q4"], reference)
    assert plain.startswith("ppl [") and "paired" not in plain
    # A single seed has no interval; the reference against itself is its plain interval.
    assert frontier.interval(rows["llm-compressor gptq-w3a16-g64"], reference) == "-"
    assert frontier.interval(reference, reference).startswith("ppl [")


def test_the_table_is_sorted_by_bits_and_the_plot_is_written(folders, tmp_path):
    peers, ours = folders
    rows = frontier.collect([peers], [ours])
    table = frontier.markdown_table(rows).splitlines()
    assert table[0].startswith("| method | rho | value bits | bits / weight |")
    bits = [float(line.split("|")[4]) for line in table[2:]]
    assert bits == sorted(bits) and bits[0] == 3.25 and bits[-1] == 16.0
    assert any("| 28.50 |" in line for line in table if line.startswith("| hassle 0.4"))  # geometric mean
    png = frontier.plot(rows, tmp_path / "docs" / "frontier.png", "test")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_seeds_that_disagree_on_bits_and_foreign_files_are_refused(tmp_path):
    folder = tmp_path / "peer"
    peer(folder, "gptq-w4a16-g64", 0, 33.0, 4.25, bits=4)
    peer(folder, "gptq-w4a16-g64", 1, 33.0, 4.5, bits=4)
    with pytest.raises(ValueError, match="seeds disagree on bits per weight"):
        frontier.collect([folder], [])
    other = tmp_path / "quality"
    write(other, "notes", {"perplexity": 1.0})
    with pytest.raises(ValueError, match="not a quality.py result"):
        frontier.collect([], [other])
    quantized = tmp_path / "quantized"
    project(quantized, "hassle-uniform-0.5-q4", 30.0, kept_fraction=0.5, value_bits=4)
    with pytest.raises(ValueError, match="quantized .* but no `bits_per_weight`"):
        frontier.collect([], [quantized])
    with pytest.raises(FileNotFoundError, match="`--peer`"):
        frontier.collect([tmp_path / "missing"], [])


def test_the_peer_checkpoint_is_weighed_by_every_tensor_of_its_target_layers(tmp_path):
    """A compressed-tensors-like W4 g64 checkpoint: int32-packed values and bf16 scales are 4.25 bits plus the
    shape records; lm_head and biases are not counted, a sparse format's `weight.bitmask` is."""
    import torch
    from safetensors.torch import save_file

    peer_module = importlib.import_module("peer_llmcompressor")

    model = torch.nn.Module()
    model.proj = torch.nn.Linear(128, 64)
    model.sparse = torch.nn.Linear(128, 8, bias=False)
    model.lm_head = torch.nn.Linear(64, 100, bias=False)
    layers = peer_module.target_layers(model)
    assert layers == {"proj": 64 * 128, "sparse": 8 * 128}
    save_file(
        {
            "proj.weight_packed": torch.zeros(64, 128 // 8, dtype=torch.int32),
            "proj.weight_scale": torch.zeros(64, 128 // 64, dtype=torch.bfloat16),
            "proj.weight_shape": torch.tensor([64, 128]),
            "proj.bias": torch.zeros(64),
            "sparse.weight.compressed": torch.zeros(512, dtype=torch.bfloat16),
            "sparse.weight.bitmask": torch.zeros(8, 16, dtype=torch.uint8),
            "lm_head.weight": torch.zeros(100, 64),
        },
        str(tmp_path / "model.safetensors"),
    )
    sizes = peer_module.checkpoint_bytes(tmp_path, layers)
    assert sizes["layer_bytes_by_tensor"] == {
        "weight_packed": 64 * 16 * 4,
        "weight_scale": 64 * 2 * 2,
        "weight_shape": 16,
        "weight.compressed": 1024,
        "weight.bitmask": 128,
    }
    assert sizes["bits_per_weight"] == pytest.approx(8 * (4096 + 256 + 16 + 1024 + 128) / (64 * 128 + 8 * 128))
    assert sizes["checkpoint_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="no tensor of 1 target layers"):
        peer_module.checkpoint_bytes(tmp_path, {**layers, "missing": 10})
