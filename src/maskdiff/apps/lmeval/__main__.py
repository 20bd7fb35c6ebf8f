"""The harness's own command line with the maskdiff model registered::

    python -m maskdiff.apps.lmeval run --model maskdiff --model_args run=runs/demo,draws=8 \\
        --tasks wikitext --limit 20 --output_path out/

(the same arguments as ``lm-eval``; lm-eval 0.4.13 discovers no models from other packages, so the
model is registered by importing :mod:`maskdiff.apps.lmeval` before the harness's CLI starts).
"""

from __future__ import annotations


def main() -> None:
    """Register the maskdiff model, then run ``lm_eval``'s command line on ``sys.argv``."""
    from lm_eval.__main__ import cli_evaluate

    import maskdiff.apps.lmeval  # noqa: F401  (registers "maskdiff")

    cli_evaluate()


if __name__ == "__main__":
    main()
