"""Training an identity embedder (an IResNet) with ArcFace's additive angular margin loss.

`python -m alignax.identity.train` (alignax-train-id) trains on an `identity_images` dataset
(alignax/identity/data.py builds one from a directory per identity, or generates a tiny synthetic
one) and exports a directory `alignax.models.iresnet.load_any` reads, for the `identity` reward.
"""
