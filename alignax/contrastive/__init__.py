"""Contrastive (CLIP) training in alignax: `loss` (symmetric InfoNCE with duplicate captions as joint
positives) and `train` (`python -m alignax.contrastive.train`, console script `alignax-train-clip`): one
vision tower and any number of text towers, saved as transformers CLIPTextModelWithProjection and CLIPModel
directories (what an SD3 pipeline's text encoders and alignax's CLIP rewards read)."""
