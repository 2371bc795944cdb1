"""The pack engine: K LoRA runs on one frozen model, each exactly as if it ran alone.

`lora` (the layer holding K adapters, the pack), `inits` (Init[A], Init[B]), `rng` (per-run,
per-purpose randomness), `packing` (the base model's dropout drawn per run), `unpadded` (BERT and
RoBERTa encoders on real tokens only), `optim` (AdamW, clipping, schedule and fp16 loss scaling
per run), `probes` (the feature norms the theory speaks of), `order` (each run's data order),
`checkpoint` (a pack's files), `peft_io` (one run <-> a PEFT adapter). Nothing here knows a task
or a sweep.
"""
