"""``mergekit-ace sweep``: merge a config over a grid of method parameters, score each merge, keep
the best. ``runner`` holds the grid, the merges and the outputs; ``cli`` the command line."""
