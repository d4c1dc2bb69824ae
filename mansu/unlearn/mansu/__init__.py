"""MANSU (docs/method.md §4): unlearning confined to the forget circuit's quantized weights, every step
projected off the retain gradients, the update floored onto NF4 codes where its forget gain is
worth its retain cost under a budget that is checked on held-out text. ``pipeline.unlearn`` is
the entry point (conf/method/mansu.yaml); each step lives in the module named for it."""

from mansu.unlearn.mansu.pipeline import unlearn

__all__ = ["unlearn"]
