"""Optimizers not in torch: THOR."""
