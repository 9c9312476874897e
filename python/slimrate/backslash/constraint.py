"""RateConstraint: apply the BackSlash rate penalty λ·R(θ) to a model at every training step.

R(θ) = (1/N)·Σ (|θ|+ε)^ν over the constrained parameters (N = their total element count), with ν
re-estimated from the weights' moments (docs/backslash.md §2–§5).  Two application modes:

- ``mode="loss"`` (§4, the paper's J = D + λ·R; "grad" is an alias): ``step()`` after ``loss.backward()``
  and before ``optimizer.step()`` adds λ·∂R/∂θ into ``p.grad``; the optimizer then applies it, so the
  learning rate, its schedule, momentum and Adam's preconditioning all act on the rate term.
- ``mode="decoupled"`` (§4, the authors' re-implementation): ``step()`` after ``optimizer.step()``
  does θ ← θ − λ·∂R/∂θ directly, with no learning rate and no optimizer state (their setting:
  λ = 2000, ε = 1).  It is a proximal-style shrink with no zero-crossing guard: a weight smaller than
  its step flips sign and oscillates around 0, as in their code.

Sharded models (docs/backslash.md §9): under DDP every rank holds the whole model and the averaged
gradients, so every rank computes the same step.  Under FSDP2 (``fully_shard``) the parameters are
DTensors; build the constraint after ``fully_shard`` (it keeps the parameter objects it was given).
The kernels run on each rank's shards, and per step one all_reduce of the statistics ([3] float64, or
[T, 3] in "tensor" scope, when ν is re-estimated) and one of R (one float64) run over the mesh.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.amp.grad_scaler import OptState

from slimrate.backslash.lam_schedules import is_saved_schedule, schedule_from_state
from slimrate.backslash.shape import shape_from_moments
from slimrate.ops import rate_grad_, rate_stats
from slimrate.ops.checks import finite_number, float_tensor_list
from slimrate.ops.rate import is_dtensor
from slimrate.ops.rate_sharded import FIX_MIXED, rate_grad_per_tensor_, rate_stats_per_tensor

MODES = ("loss", "decoupled")
# Earlier name of mode "loss"; accepted everywhere (arguments, older state dicts), reported as "loss".
MODE_ALIASES = {"grad": "loss"}
SHAPE_SCOPES = ("global", "tensor")
INCLUDES = ("weights", "all")
# ν of a tensor (or pool) whose values are all zero is undefined; it keeps its previous ν, starting
# from the Gaussian's 2.  That ν only changes R's value: sign(0) = 0, so those weights get no gradient.
NU_UNDEFINED_START = 2.0
_STATE_KEYS = ("lam", "eps", "nu", "mode", "shape_every", "shape_scope", "steps", "last_rate",
               "nu_per_tensor", "num_params", "num_tensors")

ParamFilter = Callable[[str, nn.Module, nn.Parameter], bool]
LamSchedule = Callable[[int], float]
CALLABLE_SCHEDULE = "callable"  # what state_dict() records for a plain-callable lam_schedule


def weight_layer_types() -> tuple[type, ...]:
    """Layers whose ``weight`` include="weights" constrains: Linear, Conv1d/2d/3d, Embedding, and
    transformers' GPT-2 style ``Conv1D`` (a Linear with transposed weight) when transformers is loaded."""
    types: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    hf_layers = sys.modules.get("transformers.pytorch_utils")  # never import transformers ourselves
    if hf_layers is not None and hasattr(hf_layers, "Conv1D"):
        types += (hf_layers.Conv1D,)
    return types


def select_parameters(module: nn.Module, include: str | ParamFilter) -> tuple[list[str], list[nn.Parameter]]:
    """(names, parameters) of ``module`` chosen by ``include``; trainable ones only, each shared
    (tied) parameter once.  include: "weights" (weights of the layers in ``weight_layer_types``,
    no biases or norms), "all" (every float parameter) or a callable (name, module, param) -> bool."""
    layer_types = weight_layer_types()
    names: list[str] = []
    params: list[nn.Parameter] = []
    taken: set[int] = set()
    for module_name, sub in module.named_modules():
        for param_name, p in sub.named_parameters(recurse=False):
            if id(p) in taken or not p.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if include == "weights":
                keep = isinstance(sub, layer_types) and param_name == "weight"
            elif include == "all":
                keep = p.is_floating_point()
            else:
                keep = bool(include(name, sub, p))
            if keep:
                taken.add(id(p))
                names.append(name)
                params.append(p)
    return names, params


class RateConstraint:
    """The BackSlash rate constraint λ·R(θ) on a model's weights, applied once per training step.

    module_or_params: an ``nn.Module`` (its trainable parameters chosen by ``include``) or an
        iterable of parameters (taken as given; ``include`` must then stay "weights").
    lam: λ ≥ 0.  eps: ε ≥ 0 in (|θ|+ε)^ν (soft gradient clipping; 1 in the authors' code).
    nu: "auto" (re-estimate ν̂ ∈ [0.1, 3] by moment matching every ``shape_every`` steps, before
        applying) or a fixed ν > 0.
    mode: "loss" (the paper's J = D + λ·R; "grad" is an older name for it, accepted anywhere and
        reported as "loss") — call ``step()`` after ``loss.backward()``, before ``optimizer.step()``:
        adds λ·∂R/∂θ into ``p.grad`` (creating zero grads where None), so the LR, its schedule and
        Adam's preconditioning apply to it (gradient clipping does too if it runs after ``step()``);
        "decoupled" (the authors' re-implementation) — call ``step()`` after ``optimizer.step()``:
        θ ← θ − λ·∂R/∂θ under no_grad, with no LR (docs/backslash.md §4; no zero-crossing guard).
    include: "weights" (Linear/Conv/Embedding weights; not biases or norms), "all" (every trainable
        float parameter: biases, norms and embeddings too, pooled into one ν and one N, as the
        re-implementation does), or a callable (name, module, param) -> bool.  Frozen parameters
        (requires_grad=False) are never taken; a tied parameter counts once.
    shape_scope: "global" (one ν pooled over all constrained parameters, as the authors' code) or
        "tensor" (ν per tensor; R keeps the global N, so the gradient is λ·(ν_t/N)·sign·(|θ|+ε)^(ν_t−1)).
    lam_schedule: None, or a callable k -> factor ≥ 0: the λ applied at step k (the constraint's own
        0-based step count, ``steps``) is ``lam * lam_schedule(k)``.  Ready-made ones in
        ``slimrate.backslash.lam_schedules`` (``constant``, ``linear_warmup``, ``uba_shape``) are saved by
        ``state_dict()``; a plain callable is not (the state records "callable"), so build the constraint
        that loads such a state with ``lam_schedule=`` the same callable again.
    scaler: with a ``torch.amp.GradScaler`` in mode "loss", pass it here: ``step()`` then raises
        ValueError unless ``scaler.unscale_(optimizer)`` ran this iteration.  The order is
        ``scaler.scale(loss).backward(); scaler.unscale_(optimizer); constraint.step();
        scaler.step(optimizer); scaler.update()``: called before ``unscale_``, the rate term would be
        divided by the loss scale.  Not used in mode "decoupled" (the update is applied to θ after the step).

    ``step()`` returns R (float, before the update; one device sync).  Attributes: ``last_rate``,
    ``last_lam`` (the λ applied at the last step), ``nu`` (the ν in use, first estimated at construction
    when "auto"; in "tensor" scope the element-weighted mean of ``nu_per_tensor``),
    ``nu_per_tensor``, ``num_params`` (N), ``steps``, ``params``, ``param_names``; ``current_lam()`` is
    the λ the next step applies.  ``lam`` may be changed between steps (it scales the schedule).
    Cost per step: one fused pass over the constrained parameters, plus one moment pass when ν is re-estimated.
    """

    def __init__(self, module_or_params: nn.Module | Iterable[torch.Tensor], lam: float, eps: float = 1.0,
                 nu: float | str = "auto", mode: str = "loss", shape_every: int = 1,
                 include: str | ParamFilter = "weights", shape_scope: str = "global",
                 lam_schedule: LamSchedule | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
        self.params, self.param_names = _collect(module_or_params, include)
        self.num_params = sum(p.numel() for p in self.params)
        self.steps = 0
        self.last_rate = self.last_lam = math.nan
        self._configure(lam=lam, eps=eps, nu=nu, mode=mode, shape_every=shape_every, shape_scope=shape_scope,
                        lam_schedule=lam_schedule)
        self.scaler = _check_scaler(scaler, self.mode)
        if self.auto_nu:
            self.nu_per_tensor = [NU_UNDEFINED_START] * len(self.params)
            self._update_shape()
        else:
            self.nu_per_tensor = [self._fixed_nu] * len(self.params)

    def _configure(self, *, lam, eps, nu, mode, shape_every, shape_scope, lam_schedule) -> None:
        """Check every setting, then assign them all (a bad one leaves the constraint unchanged)."""
        lam = finite_number("lam", lam, nonnegative=True)
        eps = finite_number("eps", eps, nonnegative=True)
        if isinstance(nu, str) and nu != "auto":
            raise ValueError(f"nu: expected 'auto' or a number > 0, got {nu!r}")
        auto_nu = isinstance(nu, str)
        fixed_nu = math.nan if auto_nu else finite_number("nu", nu, positive=True)
        mode = MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES} (or 'grad', an older name for 'loss'), got {mode!r}")
        if isinstance(shape_every, bool) or not isinstance(shape_every, int):
            raise TypeError(f"shape_every: expected an int, got {type(shape_every).__name__}")
        if shape_every < 1:
            raise ValueError(f"shape_every: expected an int >= 1, got {shape_every}")
        if shape_scope not in SHAPE_SCOPES:
            raise ValueError(f"shape_scope: expected one of {SHAPE_SCOPES}, got {shape_scope!r}")
        if lam_schedule is not None and not callable(lam_schedule):
            raise TypeError(f"lam_schedule: expected None or a callable step -> factor (e.g. "
                            f"slimrate.backslash.lam_schedules.linear_warmup(100)), got {type(lam_schedule).__name__}")
        self.lam, self.eps, self.auto_nu, self._fixed_nu = lam, eps, auto_nu, fixed_nu
        self.mode, self.shape_every, self.shape_scope = mode, shape_every, shape_scope
        self.lam_schedule = lam_schedule

    @property
    def nu(self) -> float:
        """The ν in use (global scope), or the element-weighted mean of the per-tensor ν."""
        if self.shape_scope == "global":
            return self.nu_per_tensor[0]
        weighted = sum(nu * p.numel() for nu, p in zip(self.nu_per_tensor, self.params, strict=True))
        return weighted / self.num_params

    def current_lam(self) -> float:
        """The λ the next ``step()`` applies: ``lam * lam_schedule(steps)`` (``lam`` without a schedule)."""
        if self.lam_schedule is None:
            return self.lam
        factor = self.lam_schedule(self.steps)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < math.inf:
            raise ValueError(f"lam_schedule: returned {factor!r} at step {self.steps}; expected a finite number >= 0")
        return self.lam * float(factor)

    def step(self) -> float:
        """Apply λ·∂R/∂θ (to the grads in mode "loss", to the weights in mode "decoupled"); return R."""
        if self.mode == "loss":
            _check_unscaled(self.scaler)
        lam = self.current_lam()
        with torch.no_grad():
            if self.auto_nu and self.steps % self.shape_every == 0:
                self._update_shape()
            targets = self._grads() if self.mode == "loss" else self.params
            signed = lam if self.mode == "loss" else -lam  # decoupled: θ += −λ·∂R/∂θ in place
            if self.shape_scope == "global":
                value = rate_grad_(self.params, targets, signed, self.nu_per_tensor[0], self.eps)
            else:
                value = rate_grad_per_tensor_(self.params, targets, signed, self.nu_per_tensor, self.eps)
        self.steps += 1
        self.last_lam = lam
        self.last_rate = value.item()
        return self.last_rate

    def _grads(self) -> list[torch.Tensor]:
        grads = []
        for name, p in zip(self.param_names, self.params, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.layout != torch.strided:
                raise ValueError(f"{name}: its gradient is {p.grad.layout}, mode='loss' needs dense "
                                 "gradients; use sparse=False in the layer or mode='decoupled'")
            grads.append(p.grad)
        return grads

    def _update_shape(self) -> None:
        if self.shape_scope == "global":
            pooled = rate_stats(self.params).tolist()
            nu = self._shape_or_keep("parameters", pooled, self.nu_per_tensor[0])
            self.nu_per_tensor = [nu] * len(self.params)
        else:
            # One device sync (and one all_reduce when sharded) for all tensors, not one per tensor.
            stats = rate_stats_per_tensor(self.params).tolist()
            named = zip(self.param_names, stats, self.nu_per_tensor, strict=True)
            self.nu_per_tensor = [self._shape_or_keep(name, s, nu) for name, s, nu in named]

    @staticmethod
    def _shape_or_keep(name: str, stats: list[float], previous: float) -> float:
        n, sum_abs, sum_sq = stats
        if not (math.isfinite(sum_abs) and math.isfinite(sum_sq)):
            raise ValueError(f"{name}: contain NaN or Inf (Σ|θ| = {sum_abs}, Σθ² = {sum_sq}); ν cannot be "
                             "estimated, so training has diverged or the weights are corrupt")
        if n == 0 or sum_abs == 0 or sum_sq == 0:
            return previous  # no shape to estimate (see NU_UNDEFINED_START)
        return shape_from_moments(n, sum_abs, sum_sq)

    def state_dict(self) -> dict[str, Any]:
        """Settings and progress as plain Python values (torch.save-able).  "lam_schedule" is None, a
        ready-made schedule's ``state_dict()``, or "callable" (a plain callable, not saved)."""
        schedule = self.lam_schedule
        saved_schedule = None if schedule is None else schedule.state_dict() if is_saved_schedule(schedule) \
            else CALLABLE_SCHEDULE
        return {"lam": self.lam, "eps": self.eps, "nu": "auto" if self.auto_nu else self._fixed_nu,
                "mode": self.mode, "shape_every": self.shape_every, "shape_scope": self.shape_scope,
                "steps": self.steps, "last_rate": self.last_rate, "nu_per_tensor": list(self.nu_per_tensor),
                "num_params": self.num_params, "num_tensors": len(self.params),
                "lam_schedule": saved_schedule, "last_lam": self.last_lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned (also of earlier versions, without "lam_schedule", and with
        mode "grad"); the constrained parameters must match in count.  A state saved with a plain-callable
        ``lam_schedule`` needs this constraint built with that callable (it is kept)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state: missing keys {missing}; pass a dict from RateConstraint.state_dict()")
        if state["num_tensors"] != len(self.params) or state["num_params"] != self.num_params:
            raise ValueError(f"state: saved for {state['num_tensors']} tensors / {state['num_params']} "
                             f"elements, this constraint has {len(self.params)} / {self.num_params}; build "
                             "it over the same parameters")
        nus = [finite_number(f"state['nu_per_tensor'][{i}]", v, positive=True)
               for i, v in enumerate(state["nu_per_tensor"])]
        if len(nus) != len(self.params):
            raise ValueError(f"state['nu_per_tensor']: expected {len(self.params)} values, got {len(nus)}")
        self._configure(lam=state["lam"], eps=state["eps"], nu=state["nu"], mode=state["mode"],
                        shape_every=state["shape_every"], shape_scope=state["shape_scope"],
                        lam_schedule=self._saved_schedule(state.get("lam_schedule")))
        self.steps = int(state["steps"])
        self.last_rate = float(state["last_rate"])
        self.last_lam = float(state.get("last_lam", math.nan))
        self.nu_per_tensor = nus

    def _saved_schedule(self, saved: dict[str, Any] | str | None) -> LamSchedule | None:
        """The schedule a state describes; for "callable", this constraint's own plain callable."""
        if saved is None:
            return None
        if saved != CALLABLE_SCHEDULE:
            return schedule_from_state(saved)
        if self.lam_schedule is None or is_saved_schedule(self.lam_schedule):
            raise ValueError("state: saved with a plain-callable lam_schedule, which a state_dict does not hold; "
                             "build this RateConstraint with lam_schedule=<the same callable> before loading")
        return self.lam_schedule

    def as_train_hook(self):
        """This constraint as a hook of ``slimrate.train.train`` (what the loop calls for a bare constraint)."""
        from slimrate.backslash.train_hook import RateConstraintHook  # train_hook imports this module

        return RateConstraintHook(self)

    def __repr__(self) -> str:
        nu = "auto" if self.auto_nu else self._fixed_nu
        return (f"RateConstraint(lam={self.lam}, eps={self.eps}, nu={nu!r}, mode={self.mode!r}, "
                f"shape_every={self.shape_every}, shape_scope={self.shape_scope!r}, "
                f"lam_schedule={self.lam_schedule!r}, tensors={len(self.params)}, num_params={self.num_params}, "
                f"steps={self.steps})")


def _check_scaler(scaler: object, mode: str) -> torch.amp.GradScaler | None:
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler: expected a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if mode != "loss":
        raise ValueError(f"scaler: only checked in mode 'loss' (the rate term enters the gradients), got mode "
                         f"{mode!r}; in mode 'decoupled' leave scaler=None")
    return scaler


def _check_unscaled(scaler: torch.amp.GradScaler | None) -> None:
    """ValueError unless ``scaler`` is off or has unscaled an optimizer's gradients since its last update()."""
    if scaler is None or not scaler.is_enabled():
        return
    # GradScaler keeps one entry per optimizer it has seen since update(), with its stage
    if not any(state["stage"] is OptState.UNSCALED for state in scaler._per_optimizer_states.values()):
        raise ValueError("step: the GradScaler has not unscaled the gradients yet, so the rate term would be "
                         "divided by the loss scale; call scaler.unscale_(optimizer) before constraint.step(), "
                         "then scaler.step(optimizer) and scaler.update()")


def _collect(module_or_params: nn.Module | Iterable[torch.Tensor],
             include: str | ParamFilter) -> tuple[list[torch.Tensor], list[str]]:
    if not (include in INCLUDES or callable(include)):
        raise ValueError(f"include: expected one of {INCLUDES} or a callable (name, module, param) -> bool, "
                         f"got {include!r}")
    if isinstance(module_or_params, nn.Module):
        names, params = select_parameters(module_or_params, include)
        where = f"{type(module_or_params).__name__} with include={include!r}"
    else:
        if include != "weights":
            raise ValueError("include: only applies to a module; with a list of parameters, filter the list")
        if isinstance(module_or_params, torch.Tensor) or not isinstance(module_or_params, Iterable):
            raise TypeError(f"module_or_params: expected an nn.Module or an iterable of parameters, got "
                            f"{type(module_or_params).__name__}; wrap a single tensor as [t]")
        params, taken = [], set()
        for p in module_or_params:
            if id(p) not in taken:  # a tied parameter listed twice would count twice in N
                taken.add(id(p))
                params.append(p)
        names = [f"params[{i}]" for i in range(len(params))]
        where = "the given parameters"
    if not params:
        raise ValueError(f"module_or_params: no parameters to constrain in {where}; pass a module with "
                         "trainable Linear/Conv/Embedding layers, include='all', or a non-empty list")
    float_tensor_list("module_or_params", params)  # float dtypes, one device
    sharded = [is_dtensor(p) for p in params]
    if any(sharded) and not all(sharded):
        raise ValueError(f"{names[sharded.index(False)]}: is a plain tensor, {names[sharded.index(True)]} a DTensor; "
                         f"{FIX_MIXED}")
    return params, names
