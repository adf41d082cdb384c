"""jaxdistill: teaching language models from their own and other models' logits."""
