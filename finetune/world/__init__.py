"""The embedded default world: a small text-to-image pipeline and a classifier reward trained on procedural shapes.

``python -m finetune.world.train`` rebuilds the shipped weights; :func:`load_world_pipeline` loads them.
"""
