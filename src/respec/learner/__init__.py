"""Drafter learning: distillation losses, the sample buffer, offline training and the online learner."""
