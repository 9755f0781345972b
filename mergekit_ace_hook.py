"""Register our merge methods (ace, actmat, tsv_m, iso_c, iso_cts, wudi) with mergekit the moment mergekit's
registry is imported.

mergekit 0.1.5 has no plugin entry point: a merge method exists for ``mergekit-yaml`` only after
``mergekit.merge_methods.register`` ran in that process. The wheel ships a ``.pth`` file whose one
line calls :func:`install` at interpreter start. ``install`` only appends a finder to
``sys.meta_path`` (no torch, no mergekit); the finder waits for ``mergekit.merge_methods`` to be
imported, lets it execute normally, then registers our methods. Everything here is idempotent.
It is a top-level module, not part of the ``mergekit_ace`` package, so interpreter start-up does
not import the package itself.
"""

import sys

_TARGET = "mergekit.merge_methods"


class _RegisteringLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from mergekit_ace.registration import register_methods

        register_methods()

    def __getattr__(self, name):  # resource readers, is_package, get_code, ...
        return getattr(self._loader, name)


class MergekitRegistrationFinder:
    """A meta-path finder that wraps the loader of ``mergekit.merge_methods`` only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, MergekitRegistrationFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        # One-shot: the module is imported once per process.
        uninstall()
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Arrange registration; if mergekit's registry is already imported, register now."""
    if _TARGET in sys.modules:
        from mergekit_ace.registration import register_methods

        register_methods()
        return
    if not any(isinstance(f, MergekitRegistrationFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MergekitRegistrationFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, MergekitRegistrationFinder)]
