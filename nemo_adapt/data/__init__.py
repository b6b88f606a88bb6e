"""Training data: JSONL formats, chat-template tokenization with answer-only loss, packing, fingerprints.

Entry points: `build_datasets(cfg.data, tokenizer, seed)` for the trainer, `load_records(path, ...)`
for the evaluator, and `attention_mask_from_segments` / `packed_seq_params` to turn a batch's
segment ids into attention inputs.
"""

from nemo_adapt.data.dataset import (
    Dataset,
    Datasets,
    build_datasets,
    collate,
    epoch_permutation,
    format_stats,
    print_data_report,
)
from nemo_adapt.data.formats import DataError, Record, RecordFile, load_records, read_records
from nemo_adapt.data.packing import (
    attention_mask_from_segments,
    cu_seqlens_from_segments,
    pack_best_fit,
    packed_seq_params,
)
from nemo_adapt.data.tokenize import TokenizedExample, pad_token_id, tokenize_chat

__all__ = [
    "DataError",
    "Dataset",
    "Datasets",
    "Record",
    "RecordFile",
    "TokenizedExample",
    "attention_mask_from_segments",
    "build_datasets",
    "collate",
    "cu_seqlens_from_segments",
    "epoch_permutation",
    "format_stats",
    "load_records",
    "pack_best_fit",
    "packed_seq_params",
    "pad_token_id",
    "print_data_report",
    "read_records",
    "tokenize_chat",
]
