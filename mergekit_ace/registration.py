"""Make ``ace``, ``actmat``, ``wudi``, ``tsv_m``, ``iso_c`` and ``iso_cts`` known to mergekit's registry (idempotent).

Called by the import hook (``mergekit_ace._import_hook``) as soon as ``mergekit.merge_methods`` is
imported in any process where the package is installed, and by ``mergekit_ace.register_methods()``.
"""



def register_methods() -> tuple:
    from mergekit import merge_methods

    from mergekit_ace.methods.ace import ace
    from mergekit_ace.methods.actmat import actmat
    from mergekit_ace.methods.iso_c import iso_c
    from mergekit_ace.methods.iso_cts import iso_cts
    from mergekit_ace.methods.tsv_m import tsv_m
    from mergekit_ace.methods.wudi import wudi

    ours = (ace, actmat, tsv_m, iso_c, iso_cts, wudi)
    known = {method.spec.name for method in merge_methods.registered_methods()}
    for method in ours:
        if method.spec.name not in known:
            merge_methods.register(method)
    return tuple(merge_methods.get(method.spec.name) for method in ours)
