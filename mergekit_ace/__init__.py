"""mergekit-ace: ACE-Merging and ACTMat, and the data-free peers TSV-M, Iso-C, Iso-CTS and WUDI-Merging, as
mergekit merge methods.

Importing this package is cheap (no torch, no mergekit). Installing the wheel is enough for
``mergekit-yaml`` to know ``merge_method: ace``, ``actmat``, ``tsv_m``, ``iso_c``, ``iso_cts`` and ``wudi``; from
Python, ``mergekit_ace.register_methods()`` does the same explicitly (idempotent).
"""

__version__ = "0.1.0"


def register_methods():
    """Register the six methods with mergekit's registry (idempotent); return them (ace, actmat, tsv_m, iso_c,
    iso_cts, wudi)."""
    from mergekit_ace.registration import register_methods as _register

    return _register()


__all__ = ["register_methods", "__version__"]
