"""mergekit-ace: ACE-Merging and ACTMat as mergekit merge methods.

Importing this package is cheap (no torch, no mergekit). Installing the wheel is enough for
``mergekit-yaml`` to know ``merge_method: ace`` and ``merge_method: actmat``; from Python,
``mergekit_ace.register_methods()`` does the same explicitly (idempotent).
"""

__version__ = "0.1.0"


def register_methods():
    """Register ``ace`` and ``actmat`` with mergekit's registry (idempotent); return them."""
    from mergekit_ace.registration import register_methods as _register

    return _register()


__all__ = ["register_methods", "__version__"]
