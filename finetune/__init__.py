"""Fine-tune diffusers text-to-image pipelines on differentiable rewards (DRaFT, DRaFT-K, DRaFT-LV, ReFL).

``python -m finetune train`` and ``python -m finetune demo`` are the command line; ``finetune.trainer.Trainer`` is
the Python entry point. This package depends on ``rewards`` and ``compose``, never the reverse.
"""
