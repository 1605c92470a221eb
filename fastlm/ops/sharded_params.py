"""FSDP2 and DeepSpeed ZeRO-3 parameters handed to the fused LM-head losses (``F.linear_cross_entropy``,
``F.linear_distillation_loss``) outside their module's forward.

The fused losses read the LM head's weight as a tensor argument. Inside the head module's own forward (how
``fastlm.patch``'s HF causal-LM loss calls them, fastlm/hf.py) FSDP2 and ZeRO-3 have gathered it already and their
hooks see the loss as the module's output. Outside it the weight is still sharded: FSDP2's parameter is a DTensor
holding this rank's rows, ZeRO-3's a ``numel() == 0`` placeholder. Multiplying by either silently gives wrong
gradients (pytorch#153354, TRL #3368), so both are gathered here, once per call (never per chunk):

- FSDP2, a parameter that gets a gradient: the loss runs inside a forward method of the FSDP2 module that owns the
  parameter (torch's ``register_fsdp_forward_method``, registered once per module). FSDP2 then does what it does
  for any forward: all-gathers the parameter in its mixed-precision policy's ``param_dtype`` (the compute dtype, not
  the fp32 master) and casts the hidden states to it, reshards after the call when ``reshard_after_forward`` says so,
  registers its pre-backward hook on the loss (it unshards again where the backward needs the weight: reduction
  "none" and fp16 recompute the logits there) and its post-backward on the hidden states, which reduce-scatters the
  gradient into the sharded parameter's ``.grad`` (in ``reduce_dtype``, averaged over the data-parallel ranks as
  FSDP2 does for every parameter).
- FSDP2, a parameter without a gradient (a frozen teacher's head, a LoRA-frozen student head, ``torch.no_grad``): a
  plain all-gather of its shard cast to ``param_dtype`` first (as FSDP2's own all-gather does), no hooks.
- ZeRO-3, a partitioned parameter: ``deepspeed.zero.GatheredParameters`` (read-only) around the call, and again
  from the moment the backward reaches the loss until the parameter's gradient is accumulated (where ZeRO-3's own
  gradient hook reduce-scatters it), as its module's backward hooks would (:func:`_gather_during_backward`).

The rule that tells an FSDP2 parameter from a vocab-sharded weight (fastlm/ops/vocab_parallel.py; FSDP2 shards on
dim 0 too, so placements cannot tell them apart): a DTensor that is the sharded parameter (``FSDPParam
.sharded_param``) of a module ``fully_shard`` was applied to, found through torch's registry of composable-API module
states, is an FSDP2 parameter; any other DTensor weight is taken as vocab-parallel (and must be ``Shard(0)`` on a
1-D mesh: tensor parallelism's column-sharded head). The unsharded parameter of FSDP2 over a tensor-parallel weight
is a DTensor on the tensor-parallel mesh: after the gather, the vocab-parallel path takes it.
"""

import sys
import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fastlm.ops.vocab_parallel import is_dtensor

_METHOD = "_fastlm_fsdp_forward"
# sharded FSDP2 parameter -> (owning FSDP module, its FSDPParam), keyed by identity (a tensor's == is elementwise);
# weak both ways: a cache of the registry scan
_OWNERS = WeakIdKeyDictionary()


def _fsdp_params(module):
    """The FSDPParams of the FSDP2 state of ``module`` (an FSDPModule); torch >= 2.14 keeps a list of param groups,
    older versions one."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    for group in groups:
        yield from group.fsdp_params


def fsdp_owner(t) -> tuple | None:
    """(FSDP module, FSDPParam) when ``t`` is the sharded parameter of an FSDP2 module, else None (see the rule in the
    module docstring). Plain tensors return at once; a DTensor costs one scan of the FSDP2 modules the first time."""
    if not is_dtensor(t) or "torch.distributed.fsdp" not in sys.modules:
        return None
    hit = _OWNERS.get(t)
    if hit is not None:
        module, fsdp_param = hit[0](), hit[1]
        if module is not None:
            return module, fsdp_param
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    for module in list(_module_state_mapping.keys()):
        if not isinstance(module, FSDPModule):
            continue
        for fsdp_param in _fsdp_params(module):
            if fsdp_param.sharded_param is t:
                _OWNERS[t] = (weakref.ref(module), fsdp_param)
                return module, fsdp_param
    return None


def _zero3_partitioned(t) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data is not gathered here (``ds_status`` other than AVAILABLE)."""
    status = getattr(t, "ds_status", None)
    return status is not None and getattr(status, "name", "") != "AVAILABLE"


def row_mean(t: Tensor) -> Tensor:
    """The float32 mean over dim 0 of ``t``, detached, whatever holds it: a plain tensor, a DTensor (an FSDP2 shard
    or a vocab-parallel weight: the global mean, as a plain tensor) or a partitioned ZeRO-3 parameter (gathered for
    the read). The post-training losses' ``logits/*`` metrics: the mean logit over the vocabulary is
    ``hidden @ row_mean(weight) + row_mean(bias)``."""
    with torch.no_grad():
        if _zero3_partitioned(t):
            import deepspeed

            with deepspeed.zero.GatheredParameters([t]):
                return t.mean(0, dtype=torch.float32).clone()
        m = t.mean(0, dtype=torch.float32)
        return m.full_tensor() if hasattr(m, "full_tensor") else m


def needs_gather(*tensors) -> bool:
    """Whether any of ``tensors`` is an FSDP2 sharded parameter or a partitioned ZeRO-3 parameter."""
    return any(t is not None and (_zero3_partitioned(t) or fsdp_owner(t) is not None) for t in tensors)


def _install(module) -> None:
    """Give the FSDP module ``module`` a forward method that runs a function (once per module)."""
    if _METHOD in module.__dict__:
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    def run(self, fn, *inputs):
        return fn(*inputs)

    setattr(module, _METHOD, types.MethodType(run, module))
    register_fsdp_forward_method(module, _METHOD)


def _unsharded(fsdp_param) -> Tensor:
    """The parameter the owning module sees while FSDP2 has it gathered (inside its forward)."""
    info = fsdp_param._module_info
    p = getattr(info.module, info.param_name)
    if p is fsdp_param.sharded_param:
        raise RuntimeError(f"FSDP2 did not gather the parameter {info.param_name!r} of {type(info.module).__name__}")
    return p


def _gather_frozen(t, fsdp_param) -> Tensor:
    """A parameter that gets no gradient: its shard cast to the mixed-precision policy's param_dtype, all-gathered."""
    from torch.distributed.tensor import DTensor

    dtype = getattr(fsdp_param, "param_dtype", None) or t.dtype
    with torch.no_grad():
        local = t.to_local().to(dtype)
        shard = DTensor.from_local(
            local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
        return shard.full_tensor()


def call(fn: Callable, inputs: tuple, params: tuple):
    """``fn(*inputs, *params)`` with ``params`` (tensors or None) gathered as the module docstring says. ``inputs``
    (the hidden states) go through FSDP2's forward hooks: cast to the compute dtype, their gradient the trigger of
    the reduce-scatter."""
    zero = [p for p in params if p is not None and _zero3_partitioned(p)]
    if zero:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
            out = call(fn, inputs, params)
        trainable = [p for p in zero if p.requires_grad]
        if torch.is_grad_enabled() and trainable and isinstance(out, Tensor) and out.requires_grad:
            _gather_during_backward(out, trainable)
        return out
    params = list(params)
    owners: dict = {}  # FSDP module -> [(index, FSDPParam)], the parameters that get a gradient
    for i, p in enumerate(params):
        hit = fsdp_owner(p) if p is not None else None
        if hit is None:
            continue
        module, fsdp_param = hit
        if torch.is_grad_enabled() and p.requires_grad:
            owners.setdefault(module, []).append((i, fsdp_param))
        else:
            params[i] = _gather_frozen(p, fsdp_param)
    return _through(list(owners.items()), fn, tuple(inputs), params)


def _gather_during_backward(out: Tensor, params: list) -> None:
    """ZeRO-3 accumulates a parameter's gradient, and reduce-scatters it from its gradient hook, while the parameter
    is gathered (its module's backward hooks gather it): autograd's AccumulateGrad lays the gradient out like the
    parameter's data, which is empty when partitioned. So the parameters are gathered again when the backward
    reaches the loss (a hook on it: before the loss's backward, which may also read them: reduction "none", fp16)
    and released once each has its gradient accumulated (a post-accumulate-grad hook, after DeepSpeed's own)."""
    import deepspeed

    state = {"ctx": None, "left": len(params), "handles": []}

    def gather(grad):
        if state["ctx"] is None:
            state["ctx"] = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            state["ctx"].__enter__()
        return grad

    def release(_param):
        state["left"] -= 1
        if state["left"] == 0 and state["ctx"] is not None:
            for handle in state["handles"]:
                handle.remove()
            state["ctx"].__exit__(None, None, None)

    out.register_hook(gather)
    state["handles"] = [p.register_post_accumulate_grad_hook(release) for p in params]


def _through(owners: list, fn: Callable, inputs: tuple, params: list):
    """Run ``fn`` inside the registered forward method of each owning FSDP module in turn (nested)."""
    if not owners:
        return fn(*inputs, *params)
    (module, items), rest = owners[0], owners[1:]
    _install(module)

    def inner(*gathered_inputs):
        ps = list(params)
        for i, fsdp_param in items:
            ps[i] = _unsharded(fsdp_param)
        return _through(rest, fn, gathered_inputs, ps)

    return getattr(module, _METHOD)(inner, *inputs)
