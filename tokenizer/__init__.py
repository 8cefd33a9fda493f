"""Stage one: the ALIT recurrent adaptive-length tokenizer and its base 2D VQ tokenizer."""

from .core.xformers_info import quiet_import_warning as _quiet_import_warning

_quiet_import_warning()  # xformers' import-time extension warning: not printed, kept for `alit doctor`
