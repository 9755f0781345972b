"""Make ``ace`` and ``actmat`` known to mergekit's registry (idempotent).

Called by the import hook (``mergekit_ace._import_hook``) as soon as ``mergekit.merge_methods`` is
imported in any process where the package is installed, and by ``mergekit_ace.register_methods()``.
"""

from typing import Tuple


def register_methods() -> Tuple:
    from mergekit import merge_methods

    from mergekit_ace.methods.ace import ace
    from mergekit_ace.methods.actmat import actmat

    known = {method.spec.name for method in merge_methods.registered_methods()}
    for method in (ace, actmat):
        if method.spec.name not in known:
            merge_methods.register(method)
    return merge_methods.get("ace"), merge_methods.get("actmat")
