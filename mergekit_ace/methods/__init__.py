"""mergekit glue: the declarative specs of ``ace`` and ``actmat`` around the pure rules."""
