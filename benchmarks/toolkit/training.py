"""Fine-tuning runs on the CPU through `transformers.Trainer`, as the recovery and GLUE benchmarks make them."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainingArguments


def cpu_training_arguments(
    output_dir: str | Path,
    *,
    batch_size: int,
    lr: float,
    steps: int,
    scheduler: str,
    warmup_steps: int,
    weight_decay: float,
    logging_steps: int,
    seed: int,
    **extra,
) -> TrainingArguments:
    """`TrainingArguments` for a CPU run of exactly `steps` optimizer steps that saves nothing and reports nowhere
    (AdamW, the Trainer's default); `extra` are further `TrainingArguments` fields."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        max_steps=steps,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
        **extra,
    )
