"""Training: the one trainer loop, its data pipeline, optimizers (``slimlm.train.optim``), checkpoints and
torch.distributed launch helpers. Fine-tuning (PEFT methods from ``slimlm.peft`` or full) and distillation
are driven by this one loop; nothing else writes a training loop.
"""
