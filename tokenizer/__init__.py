"""The hybrid AE/VQ tokenizer of HART: encoder, multi-scale residual quantizer, decoder, discriminator, losses.

Pure PyTorch model code, weight-compatible with the official HART tokenizer (state-dict keys `vae.*`, `disc.*`).
It imports neither `hart_train` nor `data_tools`. Entry points:
`tokenizer.autoencoder` (TokenizerConfig, tokenizer_config, HARTAutoEncoder, HARTAutoEncoderWithDisc),
`tokenizer.losses` (TokenizerLossConfig, TokenizerCriterion, DeadCodeTracker, restart_codes, codebook_usage),
`tokenizer.metrics` (psnr, ssim).
"""
