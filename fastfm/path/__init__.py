"""The probability path: affine paths x_t = sigma_t x0 + alpha_t x1 (registered schedulers, the learned one
included), their source densities, and the learned interpolant's max-min objective."""

from .affine import PATHS, TARGETS, AffinePath, get_path

__all__ = ["PATHS", "TARGETS", "AffinePath", "get_path"]
