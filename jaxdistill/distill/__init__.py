"""Self-distillation with privileged information: prompts, targets, losses, train step, loop."""
