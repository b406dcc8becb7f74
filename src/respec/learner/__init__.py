"""Drafter learning: distillation losses, offline training, and (later) the online learner."""
