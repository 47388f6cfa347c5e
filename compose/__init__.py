"""LoRA arithmetic and export: weighted sums and scaling of adapters, written for diffusers and SD UIs.

The operations arrive in a later release; this package depends on neither ``rewards`` nor ``finetune``.
"""
