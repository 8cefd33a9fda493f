"""Sampling and evaluation: images at chosen token budgets, FID per token count, reports."""
