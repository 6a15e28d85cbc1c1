"""Training a diffusers-format `AutoencoderKL` in alignax: `loss` (reconstruction + KL) and `train`
(`python -m alignax.autoencoder.train`, console script `alignax-train-vae`)."""
