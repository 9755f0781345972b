"""mergekit glue: the declarative specs of ``ace``, ``actmat``, ``wudi`` and the SVD peers around the pure rules."""
