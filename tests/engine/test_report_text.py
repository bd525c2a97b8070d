"""`str(CompressionReport)` fits a terminal whatever the model's size; the full data stays in `to_dict()`."""

import pytest

from optimum_oats.engine.report import MAX_BLOCK_ROWS, CompressionReport, LayerReport

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")


def _report(blocks: int) -> CompressionReport:
    layers = [
        LayerReport(
            name=f"model.layers.{block}.{kind}",
            in_features=576,
            out_features=1536,
            rank=block % 3,
            nnz=400_000,
            kept_fraction=0.5,
            relative_error=0.1 + block / 1000,
            compression_rate=0.5,
        )
        for block in range(blocks)
        for kind in KINDS
    ]
    return CompressionReport(config={"method": "hassle", "compression_rate": 0.5}, layers=layers)


@pytest.mark.parametrize("blocks", [1, 30, 200])
def test_the_text_report_fits_a_terminal(blocks):
    report = _report(blocks)
    lines = str(report).splitlines()
    assert len(lines) < 100
    assert max(len(line) for line in lines) <= 120
    assert "method=hassle" in lines[0] and f"{len(report.layers)} compressed layers" in lines[0]
    # One row per layer kind, with the block index folded out of the name.
    assert sum("model.layers.*.self_attn.q_proj" in line for line in lines) == 1
    assert sum(line.startswith("block ") for line in lines) == min(blocks, MAX_BLOCK_ROWS)
    assert ("not shown" in str(report)) == (blocks > MAX_BLOCK_ROWS)
    assert len(report.to_dict()["layers"]) == len(report.layers)


def test_the_block_rows_carry_the_block_numbers():
    text = str(_report(30))
    row = next(line for line in text.splitlines() if line.startswith("block 29 "))
    assert row.split()[-1] == "0.1290"  # the block's mean relative error
    assert repr(_report(2)).startswith("CompressionReport(layers=10, kept_fraction=")
