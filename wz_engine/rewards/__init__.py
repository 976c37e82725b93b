"""Rewards: pairwise judges (BRPO), pointwise rule rewards, a scalar reward model, DAPO shaping."""
