"""The op table: one ``Rule`` per op family, registered in the family's own file.

Importing this package registers the built-in rules. Each family file registers the
module, functional and ATen forms of its ops and says, in its docstring, what its ops
do to values along channel axes:

=================  =================================================================
``pointwise``      activations, dropout, casts, broadcasting arithmetic
``conv``           convolutions: plain, grouped, depthwise, transposed
``linear``         nn.Linear, F.linear, nn.Bilinear, matrix products
``norm``           BatchNorm, InstanceNorm, LayerNorm, RMSNorm, GroupNorm
``attention``      nn.MultiheadAttention, scaled dot-product attention
``recurrent``      nn.LSTM, nn.GRU, nn.RNN hidden units
``pool``           pooling, upsampling, padding
``reduce``         sum, mean, max, var, norm, softmax along an axis
``shape``          view/reshape/flatten, permute, expand, pixel shuffle, size queries
``join``           cat, stack, split, chunk, unbind
``index``          indexing, ATen slice/select, roll, flip
=================  =================================================================

Every overload of the Core ATen IR opset (what a decomposed ``torch.export`` graph holds)
has a rule here or a reviewed reason to need none: ``graphprune.rules.core_aten``
(``python -m graphprune.rules.core_aten`` prints the counts).

Register your own with ``graphprune.rules.register`` (see ``docs/extending.md``).
"""

from graphprune.rules import (  # noqa: F401  (registration)
    attention,
    conv,
    index,
    join,
    linear,
    norm,
    pointwise,
    pool,
    recurrent,
    reduce,
    shape,
)
from graphprune.rules.base import Multi, Operands, Rule, find_rule, register

__all__ = ["Multi", "Operands", "Rule", "find_rule", "register"]
