"""lorainit's probes inside your own transformers `Trainer` or TRL `SFTTrainer` run.

    from lorainit.hf import ProbeCallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=rows,
                      callbacks=[ProbeCallback(task="my-sst2")])
    trainer.train()   # probe/z_a_rms, ... in the logs; a run folder in args.output_dir

What: the quantities a pack's probes record (`engine/probes.py`), per PEFT LoRA layer of the
adapter the model runs, with x the layer's input before LoRA dropout, over the real tokens of the
step's batch: `z_a_rms` (RMS of A x), `lora_out_rms` (RMS of s B A x), `a_norm`, `b_norm`
(Frobenius), and, for a run whose init rewrote the base (PiSSA, OLoRA, CorDA, LoRA-GA, Init[AB]
with reset), `net_out_rms` (RMS of s (B A - B0 A0) x, with A0, B0 the factors at train begin).

When (`hf.callback`, `hf.probes`): at each step the Trainer will log (every `logging_steps`, the
first with `logging_first_step`, each epoch's last with the epoch strategy), on that step's
training forwards, before its optimiser update: hooks registered in `on_step_begin` of such a step
and removed in `on_pre_optimizer_step`, after its last backward. With gradient accumulation every
micro-batch of the step is pooled. Outside logging steps no hook exists.

Where: the mean over layers of each quantity joins the Trainer's own log entry of the step as
`probe/<name>`, so it reaches `trainer.state.log_history` and every reporting integration
(TensorBoard, W&B, MLflow). Each layer's values go to the run folder as metric rows
`probe/<layer>/<name>`, the layer named as a pack names it.

The run folder (`hf.record`; default the Trainer's `output_dir`) is a lorainit store that
`lorainit report` reads, alone or with other run folders under one parent: the run's fields (init
family, lr, seed, rank, ...), its training loss and evaluations as metric rows, its status (done,
or diverged when a logged loss or gradient norm was non-finite) and its final and best metrics.
"""

from lorainit.hf.callback import ProbeCallback, add_probes
from lorainit.hf.record import TrainerRun

__all__ = ["ProbeCallback", "TrainerRun", "add_probes"]
