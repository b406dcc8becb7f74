"""Tasks and prompts: the arithmetic generator, GSM8K-format files, question lists."""
