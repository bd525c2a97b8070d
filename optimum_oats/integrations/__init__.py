"""Glue to the rest of the ecosystem: transformers (quantizer, registration, layer swapping), the checkpoint
format and its remote code, PEFT, and the Auto classes of an architecture."""
