"""fastfm: Flow Matching and stochastic interpolants as a compiled engine."""

__version__ = "0.1.0"
