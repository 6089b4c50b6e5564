"""Data: tokenizers (byte, BPE), corpora, packing and step-indexed batches (numpy, host side)."""
from jax_spec.data.corpus import Corpus, Document, is_validation, load_corpus
from jax_spec.data.pipeline import (Batch, TextData, TokenStream, build_stream, get_batch,
                                    load_data, pack_rows, validation_batches, validation_prompts)
from jax_spec.data.tokenization import (BpeTokenizer, ByteTokenizer, load_tokenizer,
                                        make_tokenizer)
