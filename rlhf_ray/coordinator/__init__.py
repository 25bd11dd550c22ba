"""The PPO loop as timed phases, the role groups it drives, placement and metrics."""
