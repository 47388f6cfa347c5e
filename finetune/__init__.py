"""Fine-tune diffusers text-to-image pipelines on differentiable rewards (DRaFT, DRaFT-K, DRaFT-LV, ReFL).

The trainer arrives in a later release; this package depends on ``rewards`` and ``compose``, never the reverse.
"""
