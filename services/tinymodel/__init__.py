"""The tiny Stable Diffusion base model: tokenizer, architecture, procedural data, pretraining."""
