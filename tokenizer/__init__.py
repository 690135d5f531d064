"""The hybrid AE/VQ tokenizer of HART: encoder, multi-scale residual quantizer, decoder, discriminator, losses."""
