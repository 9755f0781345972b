"""``mergekit-ace sweep``: merge a config over a grid of method parameters, score each merge, keep
the best. ``grid`` parses the grid and applies a point to the config; ``runner`` merges and scores
the points (:func:`~mergekit_ace.sweep.runner.run_sweep`); ``report`` writes the tables, the chart
and ``best.yml``; ``layout`` names the output's files; ``cli`` is the command line."""
