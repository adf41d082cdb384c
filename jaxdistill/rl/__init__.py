"""The PPO core the router and the branch-search pruner both train with."""
