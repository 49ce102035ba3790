"""Op rules: one small function per op family, looked up by module type, function or method.

Importing this package registers the built-in rules. Register your own with
``graphprune.rules.register`` (see ``docs/extending.md``).
"""

from graphprune.rules import layers, pointwise, shape, tensor_ops  # noqa: F401  (registration)
from graphprune.rules.base import Multi, Rule, find_rule, register

__all__ = ["Multi", "Rule", "find_rule", "register"]
