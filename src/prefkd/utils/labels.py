"""The label convention shared by data, alignments and losses."""

IGNORE_INDEX = -100  # the label of a position that is not scored (prompt, padding); PyTorch's cross_entropy default
