"""Zero-shot perplexity of a GPT-2-token model on LAMBADA, WikiText-2/103, PTB and One Billion Words.

This is the evaluation of GPT-2 (Radford et al., 2019) as the diffusion-LM papers run it — SEDD
(Lou et al., 2024), MDLM (Sahoo et al., 2024) and MD4 (Shi et al., 2024) — for a model trained
on another corpus (OpenWebText): the NELBO of each evaluation sequence gives an upper bound on
its negative log-likelihood, and ``exp(nats per token)`` an upper bound on perplexity.

The pipeline, one module per stage (the first three use no model and no torch):

* :mod:`~maskdiff.apps.zeroshot.datasets`: the registry (:data:`DATASETS`, :func:`get_dataset`)
  and the detokenisers;
* :mod:`~maskdiff.apps.zeroshot.rows`: :func:`load_rows`, the raw rows from the Hub or a local
  file, glob or folder;
* :mod:`~maskdiff.apps.zeroshot.sequences`: the block conventions (:data:`CONVENTIONS`,
  :func:`build_sequences`) and which tokens are scored;
* :mod:`~maskdiff.apps.zeroshot.score`: :func:`zeroshot_perplexity` and :func:`run_zeroshot`,
  which score the sequences with :func:`maskdiff.evaluate.evaluate_batches` and their score masks.
"""

from maskdiff.apps.zeroshot.datasets import (
    DATASETS,
    DETOKENIZERS,
    ZeroShotDataset,
    detokenize_lambada,
    detokenize_lm1b,
    detokenize_ptb,
    detokenize_wikitext,
    get_dataset,
)
from maskdiff.apps.zeroshot.rows import load_rows
from maskdiff.apps.zeroshot.score import (
    check_gpt2_model,
    evaluate_sequences,
    format_zeroshot_table,
    run_zeroshot,
    zeroshot_perplexity,
)
from maskdiff.apps.zeroshot.sequences import (
    CONVENTIONS,
    ZeroShotSequences,
    build_sequences,
    concat_blocks,
    pad_sequences,
)

__all__ = [
    "ZeroShotDataset",
    "DATASETS",
    "CONVENTIONS",
    "get_dataset",
    "detokenize_wikitext",
    "detokenize_ptb",
    "detokenize_lm1b",
    "detokenize_lambada",
    "DETOKENIZERS",
    "load_rows",
    "ZeroShotSequences",
    "concat_blocks",
    "pad_sequences",
    "build_sequences",
    "check_gpt2_model",
    "evaluate_sequences",
    "zeroshot_perplexity",
    "format_zeroshot_table",
    "run_zeroshot",
]
