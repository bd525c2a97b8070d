"""Training-time methods: LoSparse fine-tuning (`losparse/`) and recovery fine-tuning of a compressed model."""
