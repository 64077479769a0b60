"""Hugging Face transformers integration: the fused kernels as an attention implementation.

::

    from transformers import AutoModelForCausalLM, LlamaConfig
    from infoscale_triton.integrations import transformers as it_hf

    config = LlamaConfig(...)                    # or AutoConfig.from_pretrained(...)
    it_hf.configure(config, temperature="infoscale", train_len=4096)     # optional: SDPA without it
    model = AutoModelForCausalLM.from_config(config, attn_implementation=it_hf.register())
    # or, on a model already built: model.set_attn_implementation(it_hf.register())

:func:`register` adds an attention function to transformers' ``AttentionInterface`` and, under the
same name, transformers' SDPA mask builder to its ``AttentionMaskInterface``: without the latter a
custom attention function receives ``attention_mask=None`` even for a padded batch (transformers
builds masks only for the names its mask interface knows), and silently attends to the padding.

The attention function reads its options from the config the attention layers hold
(``module.config``) at every call, so :func:`configure` may also be called after the model is built:

==========================  ====================================================================
config attribute            meaning (argument of :func:`infoscale_triton.scaled_dot_product_attention`)
==========================  ====================================================================
``infoscale_temperature``   ``temperature``: None (default), "infoscale", "logn",
                            "infoscale_clipped" or "logn_clipped"
``infoscale_train_len``     ``train_len``, N: the training length, where the temperature is 1
``infoscale_cos_scale``     ``cos_scale``, s: CosScale logits ``t_i * s * cos(q_i, k_j)``; None
                            (default) keeps the model's own ``q.k * scaling``
==========================  ====================================================================

They are plain config attributes, so ``save_pretrained`` / ``from_pretrained`` keep them. With none of
them set the function computes exactly what transformers' ``"sdpa"`` implementation does.

What the attention function does with transformers' arguments (it follows transformers'
``sdpa_attention_forward``):

* ``attention_mask``: the boolean mask (True = attend) built by the SDPA mask builder, with padding,
  sliding windows, chunks and packed sequences in it; or a float mask (a custom 4D mask), whose
  entries at or below half the dtype's lowest value (transformers writes ``finfo.min``) are taken as
  masked (``-inf``), so that the temperature's ``n_i`` does not count them.
* causal: with no mask, ``is_causal`` (the keyword, else ``module.is_causal``) applies when the query
  has more than one token, top-left aligned as in torch's SDPA. transformers leaves out the mask only
  when that equals the bottom-right (KV-cache) alignment of our kernels, or at the prefill of an empty
  static cache, whose unused key slots are then cut off as transformers does.
* ``scaling`` -> ``scale``; under CosScale it is ignored (the logit is ``s * cos``).
* ``dropout`` applies only while ``module.training``.
* GQA: key/value heads are shared through ``enable_gqa``, never repeated.
* ``position_bias`` (T5-style models): added to the logits, masked keys at ``-inf``. The kernels give
  no gradient to it: a learned bias with gradients enabled raises ``NotImplementedError`` (use
  ``torch.no_grad()`` for inference).
* ``sliding_window``, ``position_ids``, ``cu_seq_lens_q/k``, ``max_length_q/k`` and other keyword
  arguments for other implementations are ignored: the mask carries the window and the packing
  (transformers finds packed sequences from ``position_ids``, as for ``"sdpa"``). Several sequences
  given by ``cu_seq_lens_q`` with no mask (varlen, continuous batching) raise ``ValueError``.
* ``output_attentions=True``, ``softcap``, attention sinks (``s_aux``, ``sinks``) and ``head_mask``
  raise ``ValueError``: the kernels compute no attention weights and none of these logits.

Rows that may attend to no key (left padding) come out as zeros, where torch's SDPA gives NaN or an
average; those positions are padding and are never read.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import infoscale_triton
from infoscale_triton import reference
from infoscale_triton.temperature import check_temperature_options

__all__ = ["COS_SCALE_ATTR", "DEFAULT_NAME", "TEMPERATURE_ATTR", "TRAIN_LEN_ATTR", "attention_forward",
           "configure", "reference_attention_forward", "register", "settings"]

DEFAULT_NAME = "infoscale_triton"
REFERENCE_SUFFIX = "_reference"
TEMPERATURE_ATTR = "infoscale_temperature"
TRAIN_LEN_ATTR = "infoscale_train_len"
COS_SCALE_ATTR = "infoscale_cos_scale"

# Keyword arguments whose meaning the kernels cannot reproduce: an error, never a silent change.
_UNSUPPORTED = {
    "output_attentions": "the kernels compute no attention weights; use attn_implementation='eager'",
    "softcap": "logit soft-capping is not implemented",
    "s_aux": "attention sinks are not implemented",
    "sinks": "attention sinks are not implemented",
    "head_mask": "head masks are not implemented",
}


def _check_settings(temperature: object, train_len: object, cos_scale: object,
                    names: tuple[str, str, str], config: PreTrainedConfig | None = None) -> None:
    """Raise ValueError / TypeError naming the argument (``names``: how to call temperature, train_len
    and cos_scale in the messages)."""
    t_name, n_name, s_name = names
    hint = ""
    if config is not None and getattr(config, "max_position_embeddings", None) is not None:
        hint = (f" config.max_position_embeddings ({config.max_position_embeddings}) is the longest "
                "position the model supports, often an extended context rather than the training "
                "length: pass it explicitly if it is the length the model was trained at.")
    check_temperature_options(
        temperature, train_len, names=(t_name, n_name), train_len_hint=hint,
        tensor_refused="a per-row tensor temperature depends on the batch and cannot live in a config (call "
                       "infoscale_triton.scaled_dot_product_attention directly for that)")
    if cos_scale is not None and (not isinstance(cos_scale, numbers.Real) or isinstance(cos_scale, bool)
                                  or not math.isfinite(cos_scale) or cos_scale <= 0):
        raise ValueError(f"{s_name} must be None or a finite number > 0 (the paper uses 32 to 256), "
                         f"got {cos_scale!r}")


def _configs(config: PreTrainedConfig) -> Iterator[PreTrainedConfig]:
    """``config`` and its sub-configs (``text_config``, ``vision_config``...), recursively."""
    yield config
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            yield from _configs(sub)


def configure(config: PreTrainedConfig, *, temperature: str | None = None, train_len: int | None = None,
              cos_scale: float | None = None) -> PreTrainedConfig:
    """Set the logit temperature and CosScale on a transformers config; returns it.

    Args:
        config: the model's config (a ``PreTrainedConfig``). The attributes are set on it and on its
            sub-configs (``text_config`` and the like), so the attention layers of a composite model see
            them too.
        temperature: None (no temperature), ``"infoscale"``, ``"logn"``, ``"infoscale_clipped"`` or
            ``"logn_clipped"`` (see :func:`infoscale_triton.scaled_dot_product_attention`).
        train_len: ``N``, the length the model was trained at (int >= 2), where the temperature is 1;
            required by a temperature. There is deliberately no default: ``max_position_embeddings`` is
            the longest position the model supports, which for length-extended models (rope scaling,
            YaRN...) is many times the training length; taking it for N would set ``t < 1`` over most of
            the usable range, the opposite of what the temperature is for.
        cos_scale: ``s`` > 0 for CosScale logits ``t_i * s * cos(q_i, k_j)`` (the model's ``scaling``
            is then unused), or None.

    Each call sets all three attributes: a call without ``temperature`` turns the temperature off.

    Raises:
        TypeError if ``config`` is not a ``PreTrainedConfig`` or ``temperature`` is a tensor;
        ValueError naming the argument for a bad value.
    """
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
    _check_settings(temperature, train_len, cos_scale, ("temperature", "train_len", "cos_scale"), config)
    for c in _configs(config):
        setattr(c, TEMPERATURE_ATTR, temperature)
        setattr(c, TRAIN_LEN_ATTR, None if train_len is None else int(train_len))
        setattr(c, COS_SCALE_ATTR, None if cos_scale is None else float(cos_scale))
    return config


def settings(config: PreTrainedConfig | None) -> dict[str, Any]:
    """The keyword arguments ``temperature``, ``train_len`` and ``cos_scale`` that ``config`` sets (all
    None without a config or attributes), validated: what the attention function passes on."""
    found = (getattr(config, TEMPERATURE_ATTR, None), getattr(config, TRAIN_LEN_ATTR, None),
             getattr(config, COS_SCALE_ATTR, None))
    names = tuple(f"config.{a}" for a in (TEMPERATURE_ATTR, TRAIN_LEN_ATTR, COS_SCALE_ATTR))
    if torch.compiler.is_compiling():  # (traced once per graph: no need for the memo)
        _check_settings(*found, names, config)
    else:
        typed = tuple((type(x), x) for x in found)  # (2.0 == 2, but train_len=2.0 is refused)
        try:
            checked = typed in _CHECKED
        except TypeError:  # an unhashable value: checked below, and refused
            checked = False
        if not checked:
            _check_settings(*found, names, config)
            if len(_CHECKED) < 64:
                _CHECKED.add(typed)
    return dict(zip(("temperature", "train_len", "cos_scale"), found))


# Settings found valid: the attention function reads the config at every call (once per layer and token),
# and a set lookup is cheaper than the checks. Valid values are strings, ints, floats and None.
_CHECKED: set[tuple] = set()


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    """A float mask with transformers' ``finfo.min`` (and anything below half of it) made ``-inf``: our
    kernels count a key as masked, for the temperature's ``n_i``, only at ``-inf``."""
    return mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))


def _attention(sdpa: Callable[..., torch.Tensor], module: torch.nn.Module, query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None, dropout: float, is_causal: bool | None,
               position_bias: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    for name, why in _UNSUPPORTED.items():
        given = kwargs.get(name)
        if given is not None and given is not False:
            raise ValueError(f"{name}={kwargs[name]!r} is not supported by the infoscale_triton attention: "
                             f"{why}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}; "
                        "register() the attention so that transformers builds SDPA masks for it")
    packed = kwargs.get("cu_seq_lens_q")
    if attention_mask is None and isinstance(packed, torch.Tensor) and packed.numel() > 2:
        raise ValueError(f"cu_seq_lens_q gives {packed.numel() - 1} packed sequences but no attention mask "
                         "came with them: varlen batches / continuous batching are not supported (pass "
                         "position_ids instead, from which transformers builds the packed mask)")
    opts = settings(getattr(module, "config", None))
    q_len, kv_len = query.shape[2], key.shape[2]

    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:
        # Prefill of an empty static cache: transformers relies on torch's top-left alignment, under
        # which the key slots past q_len (not written yet) are never seen; cut them off, as it does.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
    elif causal and kv_len < q_len:  # top-left alignment, which our is_causal does not give here
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        causal = False

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = _float_mask(attention_mask)
    if position_bias is not None:
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, position_bias, float("-inf"))
        else:
            attention_mask = position_bias + attention_mask

    out = sdpa(query, key, value, attn_mask=attention_mask,
               dropout_p=dropout if module.training else 0.0, is_causal=causal,
               scale=None if opts["cos_scale"] is not None else scaling,
               enable_gqa=query.shape[1] != key.shape[1], **opts)
    return out.transpose(1, 2).contiguous(), None


def _attention_function(sdpa: Callable[..., torch.Tensor], name: str,
                        what: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        return _attention(sdpa, module, query, key, value, attention_mask, scaling, dropout, is_causal,
                          position_bias, kwargs)

    forward.__doc__ = (
        f"transformers attention function backed by {what}: query ``(B, Hq, Lq, D)``, key / value "
        "``(B, Hkv, Lk, D)``, returns ``(attn_output (B, Lq, Hq, D) contiguous, None)``. Options from "
        "``module.config`` (see :func:`configure` and the module's docstring).")
    forward.__name__ = forward.__qualname__ = name
    return forward


attention_forward = _attention_function(infoscale_triton.scaled_dot_product_attention, "attention_forward",
                                        "the fused Triton kernels")
reference_attention_forward = _attention_function(reference.scaled_dot_product_attention,
                                                  "reference_attention_forward",
                                                  "the plain PyTorch reference (for checks)")


def register(name: str = DEFAULT_NAME) -> str:
    """Register the fused attention under ``name`` and the PyTorch reference under ``name + "_reference"``
    in transformers' ``AttentionInterface``, each with transformers' SDPA mask builder in its
    ``AttentionMaskInterface`` (so that padded batches get their mask). Idempotent. Returns ``name``,
    for ``from_pretrained(..., attn_implementation=register())`` or ``model.set_attn_implementation``.

    Raises:
        ValueError if ``name`` is empty or either name is already taken by another function (e.g.
        ``"sdpa"``): registering would replace it for every model in the process.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    pairs = ((name, attention_forward), (name + REFERENCE_SUFFIX, reference_attention_forward))
    for key, fn in pairs:
        for interface, ours in ((AttentionInterface, fn), (AttentionMaskInterface, sdpa_mask)):
            taken = interface._global_mapping.get(key)
            if taken is not None and taken is not ours:
                raise ValueError(f"name {key!r} is already registered in transformers' {interface.__name__} "
                                 f"(to {getattr(taken, '__qualname__', taken)!r}); pick another name")
    for key, fn in pairs:
        AttentionInterface.register(key, fn)
        AttentionMaskInterface.register(key, sdpa_mask)
    return name
