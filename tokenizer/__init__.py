"""Stage one: the ALIT recurrent adaptive-length tokenizer and its base 2D VQ tokenizer."""
