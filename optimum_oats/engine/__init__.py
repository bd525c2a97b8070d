"""The compression engine: find the blocks, capture and replay their inputs, collect statistics, run the algorithm
layer by layer; offloading, resuming and `torchrun` splitting around that loop.

Imports run downwards only: `data`, `algorithms`, `nn`, `config` and `utils`, never the transformers integration.
"""
