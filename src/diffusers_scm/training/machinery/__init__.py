"""The machinery of a training run, the same for every objective: flags (`arguments`), the accelerator and what it
prepares (`run`), the loop (`loop`), checkpoints (`checkpointing`), EMA (`ema`), FSDP2 (`fsdp`), LoRA (`lora`), the
output-folder lock (`output_lock`), and the end of a run (`publishing`)."""
