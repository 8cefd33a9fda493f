"""Stage two: MaskGIT and autoregressive priors over variable-length 1D token ids."""
