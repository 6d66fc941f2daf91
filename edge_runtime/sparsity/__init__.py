"""Activation-sparsity semantics: predictors, per-layer statistics."""
