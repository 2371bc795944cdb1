"""lorainit: LoRA finetuning with exact Init[A]/Init[B], packed sweeps, and the paper's theory."""

__version__ = "0.1.0"
