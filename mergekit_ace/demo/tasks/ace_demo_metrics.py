"""Scorers for the demo's lm-eval tasks (lm-eval's ``!function`` loads this file by path, so it
lives next to the YAMLs and forwards to the package)."""

from mergekit_ace.demo.skills import process_results_exact, process_results_rpn  # noqa: F401
