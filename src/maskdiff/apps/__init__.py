"""Applications on run folders: evaluation, generation, comparison, plots, zero-shot and
generative perplexity. Library functions only (no argparse: the command line is
:mod:`maskdiff.cli`). Import them by module, e.g. ``from maskdiff.apps.likelihood import run_eval``.
"""
