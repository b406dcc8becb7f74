"""Adapters to other stacks: ReSpec as TRL's rollout backend."""
