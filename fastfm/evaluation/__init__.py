"""Evaluation: test NLL, sample quality, transport diagnostics, Fréchet distances, budgets and curves."""
