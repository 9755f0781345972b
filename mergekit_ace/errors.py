"""The package's two exceptions.

``UserError``: a mistake in what the user asked for (a flag, a file, a task name); the CLI prints it
without a traceback and exits 2. ``MergeInputError``: an input a rule cannot merge (non-finite values,
mismatched shapes, a zero task vector, ...); raised by the rules in ``rules/``, it names the tensor,
and the model where one is to blame, and mergekit-yaml exits non-zero with it.
"""


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""


class MergeInputError(ValueError):
    """An input the rule cannot merge (non-finite values, mismatched shapes, zero task vector, ...).

    The message always names the tensor, and the model where one is to blame.
    """
