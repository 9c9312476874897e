"""RateConstraintCallback: run a RateConstraint inside a transformers ``Trainer``.

Imports transformers; ``slimrate.backslash`` loads this module only when the callback is first used.
"""

from __future__ import annotations

from slimrate.backslash.constraint import RateConstraint
from slimrate.backslash.train_hook import log_entries

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError("RateConstraintCallback needs transformers; install it with "
                      "`pip install 'slimrate[hf]'`") from error


class RateConstraintCallback(TrainerCallback):
    """Apply ``constraint.step()`` once per optimizer step of a transformers ``Trainer``.

    mode "loss": on ``on_pre_optimizer_step``.  In transformers 5.x the Trainer calls it after the
        backward passes of all accumulation micro-batches and after gradient clipping (which always
        runs, with max_norm = inf when ``max_grad_norm`` is 0, so AMP gradients are already unscaled),
        right before ``optimizer.step()``.  So λ·∂R/∂θ is added to the clipped gradient: the LR, its
        schedule and Adam's preconditioning apply to it, the clipping does not.
    mode "decoupled": on ``on_step_end``, after ``optimizer.step()`` (as the authors' re-implementation,
        docs/backslash.md §4): θ ← θ − λ·∂R/∂θ with no LR.
    On every log, R, ν and λ of the last step are added as "backslash_rate", "backslash_nu" and
    "backslash_lam" to the
    logged dict and to ``state.log_history``; reporting integrations (``report_to``) run before user
    callbacks, so to have them record these too, put this callback first:
    ``trainer.callback_handler.callbacks.insert(0, callback)``.
    Not for DeepSpeed, whose engine owns the gradients and the step.

    Sharded training (docs/backslash.md §9): under DDP the constraint works unchanged.  Under FSDP2 build
    the constraint over the model after ``fully_shard`` (root included); R and ν are then all-reduced over
    the mesh (one all_reduce for ν's statistics, one for R per step) and equal on every rank.  accelerate's
    FSDP shards the model inside ``Trainer.train()``, replacing its parameters, so a constraint built before
    would update tensors the model no longer uses: ``on_train_begin`` checks that the constraint's
    parameters are still the model's and raises ValueError otherwise.  Build it on a model sharded before
    the Trainer sees it: by transformers at load time (``from_pretrained(..., distributed_config=
    DistributedConfig(fsdp_size=N))``; tested on 2 CPU processes), or by ``fully_shard`` yourself with
    ``fsdp_config={"fsdp_version": 2}``, which accelerate leaves as it is on GPUs (on the CPU accelerate
    ignores the FSDP arguments and wraps the model in DDP, which fails on DTensor parameters).
    """

    def __init__(self, constraint: RateConstraint) -> None:
        if not isinstance(constraint, RateConstraint):
            raise TypeError(f"constraint: expected a RateConstraint, got {type(constraint).__name__}")
        self.constraint = constraint

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        current = {id(p) for p in model.parameters()}
        stale = [name for name, p in zip(self.constraint.param_names, self.constraint.params, strict=True)
                 if id(p) not in current]
        if stale:
            raise ValueError(f"constraint: {stale[0]} and {len(stale) - 1} more of its {len(self.constraint.params)} "
                             "parameters are no longer parameters of the Trainer's model (accelerate's FSDP replaces "
                             "them when it shards the model); build the RateConstraint on a model that is sharded "
                             "already: from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)), or "
                             "(on GPUs) fully_shard applied yourself with fsdp_config={'fsdp_version': 2}")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.constraint.mode == "loss":
            self.constraint.step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.constraint.mode == "decoupled":
            self.constraint.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        entries = log_entries(self.constraint)
        if logs is None or not entries:
            return
        logs.update(entries)
        if state.log_history:  # Trainer.log appends a copy of ``logs`` just before on_log
            state.log_history[-1].update(entries)
