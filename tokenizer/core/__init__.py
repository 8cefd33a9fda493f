"""The shared home of the stack: configuration, data, attention, checkpoint I/O, pretrained-weight
resolution and the one training loop. Every package (tokenizer, generator, sampling, slurm) may import
from here; nothing here imports a model package."""
