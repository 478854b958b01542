"""Cross-tokenizer alignments, computed as data (docs/methods.md §1, §6): word-start markers, MinED's vocabulary map,
DTW over token strings, the MinED precompute hook, and PrefKD's parent tokens (docs/methods.md §10).
CLI: ``python -m prefkd.align vocab-map``."""

from prefkd.align.dtw import dtw_align
from prefkd.align.markers import strip_marker, token_strings, word_start_marker
from prefkd.align.mined import MinEDAligner, alignment_rate
from prefkd.align.parent_tokens import (
    Parent,
    add_eos_parent,
    build_parents,
    cut_positions,
    parent_index_map,
    parent_logprobs,
    parent_tokens,
    response_parents,
    token_offsets,
    truncate_parents,
)
from prefkd.align.vocab_map import (
    build_vocab_map,
    invert_map,
    load_or_build_vocab_map,
    load_vocab_map,
    map_to_tensor,
    save_vocab_map,
)

__all__ = [
    "MinEDAligner",
    "Parent",
    "add_eos_parent",
    "build_parents",
    "cut_positions",
    "parent_index_map",
    "parent_logprobs",
    "parent_tokens",
    "response_parents",
    "token_offsets",
    "truncate_parents",
    "alignment_rate",
    "build_vocab_map",
    "dtw_align",
    "invert_map",
    "load_or_build_vocab_map",
    "load_vocab_map",
    "map_to_tensor",
    "save_vocab_map",
    "strip_marker",
    "token_strings",
    "word_start_marker",
]
