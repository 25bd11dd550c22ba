"""Environments for multi-turn episodes (``rollout.env``): the contract and the built-in ones."""
