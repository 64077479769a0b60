"""The Hugging Face transformers integration: tiny randomly initialised models (Llama with GQA; Mistral's
sliding window; BERT) with our attention, against transformers' own ``"sdpa"`` (no temperature) and
against the package's PyTorch reference registered the same way (temperatures, CosScale): forward,
gradients and greedy generation, padded, packed and not.

Budget: the logits in the model's dtype against the same model in float64, within 2x the error of the
comparison implementation run in that dtype plus ``FLOOR`` (1e-5 relative in float32), as for the kernels
(helpers.assert_within_budget). Two float32 layers give a relative error of a few 1e-7 for either
attention (float32 rounding through rotary, RMSNorm, the MLP and the head); the floor is 1e-5 as for
the kernels alone, and far below what the options under test change: a missing padding mask, the
temperatures and CosScale move the logits by 0.1 to 0.8 relative here (asserted > MEASURABLE below, so
that these tests can fail).

Kernels: the prompts are 12 tokens, so an inference call that comes without a mask (an unpadded
batch) runs the split-KV decode kernel (at most 16 query rows: attention.decodes), one with a mask the
dense kernel, as for any user; test_generate_runs_through_the_decode_kernel checks the routing of a
generation step by step.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from helpers import DEVICE, DTYPES, FLOOR, assert_within_budget, rel_error
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    LlamaConfig,
    LlavaConfig,
    MistralConfig,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from infoscale_triton.integrations import transformers as it_hf

NAME = it_hf.register()
REFERENCE = NAME + "_reference"
LENGTH, PADS = 12, 3  # prompt length; left padding of the second sequence
# an effect the options must have on the logits, far above any rounding (see the module docstring)
MEASURABLE = 1e-2


def tiny_llama(dtype: torch.dtype = torch.float32, implementation: str = NAME,
               config_class: type = LlamaConfig, **extra: Any) -> torch.nn.Module:
    """2 layers, 4 query heads sharing 2 key/value heads, head_dim 16 (the kernels' minimum); weights
    drawn with std 0.1 (transformers' 0.02 leaves the attention almost uniform). The same seed for all."""
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                          initializer_range=0.1, pad_token_id=0, **extra)
    return seeded(AutoModelForCausalLM, config, implementation).to(dtype)


def seeded(auto_class: type, config: Any, implementation: str = NAME) -> torch.nn.Module:
    """The model of ``config``, initialised under seed 0 (leaving the test's generator alone), in eval."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto_class.from_config(config, attn_implementation=implementation)
    return model.to(DEVICE).eval()


def prompt(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for a batch of 2; ``padded``: the second left-padded by PADS."""
    ids = torch.randint(1, 128, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    if padded:
        mask[1, :PADS] = 0
        ids[1, :PADS] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@torch.no_grad()
def logits(model: torch.nn.Module, implementation: str, ids: torch.Tensor, mask: torch.Tensor | None,
           dtype: torch.dtype | None = None, **kwargs: Any) -> torch.Tensor:
    """The model's logits with ``implementation`` (a float64 copy of it if ``dtype`` is float64)."""
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation(implementation)
    return model(ids, attention_mask=mask, **kwargs).logits


def assert_logits_match(model: torch.nn.Module, implementation: str, truth: str, ids: torch.Tensor,
                        mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """Our logits against ``truth`` in float64, within 2x the error of ``truth`` in the model's dtype
    plus FLOOR, on the positions that are not padding. Returns ours."""
    dtype = next(model.parameters()).dtype
    valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
    ref64 = logits(model, truth, ids, mask, torch.float64, **kwargs)[valid].double()
    low = logits(model, truth, ids, mask, **kwargs)[valid].double()
    ours = logits(model, implementation, ids, mask, **kwargs)
    assert_within_budget(ours[valid], ref64, low, dtype, f"{implementation} vs {truth}: ")
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_no_temperature_matches_sdpa(dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    ids, mask = prompt(padded=False)
    assert_logits_match(model, NAME, "sdpa", ids, mask)


def test_left_padding_matches_sdpa() -> None:
    """The mask trap: a function registered without a mask builder gets attention_mask=None and attends
    to the padding."""
    model = tiny_llama()
    ids, mask = prompt(padded=True)
    ours = assert_logits_match(model, NAME, "sdpa", ids, mask)
    unmasked = logits(model, NAME, ids, None)
    valid = mask[1].bool()
    assert rel_error(unmasked[1, valid], ours[1, valid].double()) > MEASURABLE, "no effect: weak test"


def test_packed_sequences_and_sliding_window_match_sdpa() -> None:
    """Masks that transformers builds for us: two sequences packed in a row (found from position_ids,
    with no attention_mask) and a sliding window (Mistral, window 5 < 12 tokens)."""
    ids, _ = prompt(padded=False)
    positions = torch.stack([torch.arange(LENGTH), torch.cat([torch.arange(5), torch.arange(LENGTH - 5)])])
    model = tiny_llama()
    packed = assert_logits_match(model, NAME, "sdpa", ids, None, position_ids=positions.to(DEVICE))
    whole = logits(model, NAME, ids, None)
    assert rel_error(whole[1, 5:], packed[1, 5:].double()) > MEASURABLE, "packing has no effect: weak test"

    windowed = tiny_llama(config_class=MistralConfig, sliding_window=5)
    ours = assert_logits_match(windowed, NAME, "sdpa", ids, None)
    full = logits(tiny_llama(config_class=MistralConfig, sliding_window=None), NAME, ids, None)
    # the same weights: the first 5 rows see the same keys (a masked and an unmasked kernel variant: equal
    # through the interpreter, within float32 rounding compiled)
    assert rel_error(full[:, :5], ours[:, :5].double()) <= FLOOR[torch.float32]
    assert rel_error(full[:, 5:], ours[:, 5:].double()) > MEASURABLE, "the window has no effect: weak test"


def test_bidirectional_encoder_matches_sdpa() -> None:
    """BERT (not causal), right-padded: padding keys masked in every row."""
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, initializer_range=0.1)
    model = seeded(AutoModelForMaskedLM, config)
    ids, mask = prompt(padded=True)
    mask = mask.flip(-1)
    ours = assert_logits_match(model, NAME, "sdpa", ids, mask)
    valid = mask[1].bool()
    unmasked = logits(model, NAME, ids, None)
    assert rel_error(unmasked[1, valid], ours[1, valid].double()) > MEASURABLE, "no effect: weak test"


OPTIONS = {
    "infoscale": {"temperature": "infoscale", "train_len": 8},
    "logn_clipped": {"temperature": "logn_clipped", "train_len": 4},
    "cos_scale": {"cos_scale": 16.0},
    "cos_scale+infoscale": {"cos_scale": 16.0, "temperature": "infoscale", "train_len": 8},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_options_match_reference(options: dict[str, Any]) -> None:
    """Read from the config at call time (configure after the model is built), padded batch: the
    temperature's n_i must leave the padding out."""
    model = tiny_llama()
    ids, mask = prompt(padded=True)
    plain = logits(model, NAME, ids, mask)
    it_hf.configure(model.config, **options)
    ours = assert_logits_match(model, NAME, REFERENCE, ids, mask)
    valid = mask.bool()
    assert rel_error(ours[valid], plain[valid].double()) > MEASURABLE, "the options changed nothing"


def test_temperature_ignores_padding() -> None:
    """With InfoScale on, the left-padded sequence gives the logits of the same sequence alone (same
    positions): n_i counts no padding key. Independent of the reference, which shares our wrapper."""
    model = tiny_llama()
    it_hf.configure(model.config, temperature="infoscale", train_len=8)
    ids, mask = prompt(padded=True)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ours = logits(model, NAME, ids, mask, position_ids=positions)[1, PADS:]
    alone = ids[1:, PADS:], mask[1:, PADS:]
    ref64 = logits(model, REFERENCE, *alone, torch.float64)[0].double()
    low = logits(model, REFERENCE, *alone)[0].double()
    assert_within_budget(ours, ref64, low, torch.float32, "padded vs alone: ")


def test_training_gradients_match_reference() -> None:
    """Training mode, padded batch, InfoScale: the loss's gradients of every parameter (through our
    fused backward) against those through the reference, in float64 and float32."""
    model = tiny_llama().train()
    it_hf.configure(model.config, temperature="infoscale", train_len=8)
    ids, mask = prompt(padded=True)
    labels = ids.masked_fill(mask == 0, -100)

    def gradients(implementation: str, dtype: torch.dtype) -> torch.Tensor:
        copied = copy.deepcopy(model).to(dtype)
        copied.set_attn_implementation(implementation)
        copied(ids, attention_mask=mask, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten() for p in copied.parameters()]).double()

    ours = gradients(NAME, torch.float32)
    assert_within_budget(ours, gradients(REFERENCE, torch.float64), gradients(REFERENCE, torch.float32),
                         torch.float32, "parameter gradients: ")


GENERATE = {
    "no_temperature-padded-dynamic": ({}, "sdpa", True, "dynamic"),
    "infoscale-padded-dynamic": (OPTIONS["infoscale"], REFERENCE, True, "dynamic"),
    # no padding: the prefill of an empty static cache comes without a mask, with key slots not yet
    # written after the prompt (cut off, as transformers does)
    "infoscale-static": (OPTIONS["infoscale"], REFERENCE, False, "static"),
}


@pytest.mark.parametrize("options,truth,padded,cache", GENERATE.values(), ids=GENERATE.keys())
def test_generate_matches(options: dict[str, Any], truth: str, padded: bool, cache: str) -> None:
    """Greedy generation with a KV cache: the same tokens as ``truth`` (with a dynamic cache), and the
    same scores at every step (within the float32 floor)."""
    model = tiny_llama()
    it_hf.configure(model.config, **options)
    ids, mask = prompt(padded)
    runs = {}
    for implementation, cache_implementation in ((NAME, cache), (truth, "dynamic")):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            # transformers compiles the forward for a static cache on CUDA; torch.compile support (custom
            # operators) is not built yet, so generation runs eagerly here
            runs[implementation] = model.generate(
                ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True,
                cache_implementation=cache_implementation, return_dict_in_generate=True, output_scores=True,
                disable_compile=True)
    ours, ref = runs[NAME], runs[truth]
    assert ours.sequences.shape == (2, LENGTH + 4)
    assert torch.equal(ours.sequences, ref.sequences), f"{ours.sequences} != {ref.sequences}"
    for step, (a, b) in enumerate(zip(ours.scores, ref.scores)):
        assert rel_error(a, b.double()) <= FLOOR[torch.float32], f"scores differ at step {step}"


DECODE_PROMPT, NEW_TOKENS = 20, 4  # a prompt above decode.MAX_QUERY_ROWS: its prefill runs the dense kernel


@pytest.mark.parametrize("options,truth", [({}, "sdpa"), (OPTIONS["infoscale"], REFERENCE)],
                         ids=["no_temperature", "infoscale"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_generate_runs_through_the_decode_kernel(options: dict[str, Any], truth: str, padded: bool,
                                                 decode_calls: list[tuple[int, int]]) -> None:
    """Greedy generation with a dynamic cache: after the dense prefill, every new token of every layer
    runs the split-KV decode kernel (one query row against the whole cache, however short), with the
    tokens and scores of ``truth``; a left-padded batch's steps too, with their (B, 1, 1, Lk) mask."""
    model = tiny_llama()
    it_hf.configure(model.config, **options)
    ids = torch.randint(1, 128, (2, DECODE_PROMPT), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :PADS] = 0
        ids[1, :PADS] = 0
    runs = {}
    for implementation in (NAME, truth):
        model.set_attn_implementation(implementation)
        decode_calls.clear()
        with torch.no_grad():
            runs[implementation] = model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                cache_implementation="dynamic", return_dict_in_generate=True, output_scores=True,
                disable_compile=True)
        if implementation == NAME:
            ours_calls = list(decode_calls)
    layers = model.config.num_hidden_layers
    steps = [(1, DECODE_PROMPT + step) for step in range(1, NEW_TOKENS) for _ in range(layers)]
    assert ours_calls == steps, f"decode kernel launches (Lq, Lk): {ours_calls}, expected {steps}"
    assert decode_calls == [], f"{truth} ran our decode kernel"
    ours, ref = runs[NAME], runs[truth]
    assert torch.equal(ours.sequences, ref.sequences), f"{ours.sequences} != {ref.sequences}"
    for step, (a, b) in enumerate(zip(ours.scores, ref.scores)):
        assert rel_error(a, b.double()) <= FLOOR[torch.float32], f"scores differ at step {step}"


class Attention(torch.nn.Module):
    """What the attention function reads from an attention layer (in eval mode, as a model's)."""

    def __init__(self, is_causal: bool = True, **options: Any) -> None:
        super().__init__()
        self.train(False)
        self.is_causal = is_causal
        self.config = it_hf.configure(LlamaConfig(), **options)


def recorded_call(module: torch.nn.Module, lq: int = 5, lk: int = 5, mask: torch.Tensor | None = None,
                  **kwargs: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """Call an attention function backed by a recorder instead of a kernel: (its arguments, output)."""
    seen: dict[str, Any] = {}

    def record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **opts: Any) -> torch.Tensor:
        seen.update(opts, key=key)
        return torch.zeros(*query.shape[:3], value.shape[-1])

    fn = it_hf._attention_function(record, "record", "a recorder")
    out, weights = fn(module, torch.randn(2, 4, lq, 16), torch.randn(2, 2, lk, 16), torch.randn(2, 2, lk, 16),
                      mask, **kwargs)
    assert weights is None and out.shape == (2, lq, 4, 16) and out.is_contiguous()
    return seen, out


def test_call_arguments() -> None:
    """How transformers' arguments become ours: dropout, scale, GQA, causal (as sdpa_attention_forward)."""
    seen, _ = recorded_call(Attention(), scaling=0.3, dropout=0.1)
    assert seen["dropout_p"] == 0.0 and seen["scale"] == 0.3 and seen["enable_gqa"] and seen["is_causal"]
    assert seen["key"].shape[1] == 2 and seen["temperature"] is None and seen["cos_scale"] is None
    seen, _ = recorded_call(Attention().train(), scaling=0.3, dropout=0.1)
    assert seen["dropout_p"] == 0.1
    seen, _ = recorded_call(Attention(cos_scale=32.0, temperature="logn", train_len=16), scaling=0.3)
    assert seen["scale"] is None and seen["cos_scale"] == 32.0
    assert seen["temperature"] == "logn" and seen["train_len"] == 16

    assert not recorded_call(Attention(is_causal=False))[0]["is_causal"]
    assert not recorded_call(Attention(), is_causal=False)[0]["is_causal"]
    assert not recorded_call(Attention(is_causal=False), lq=1)[0]["is_causal"]  # decoding: all keys
    assert recorded_call(Attention(is_causal=False), is_causal=True)[0]["is_causal"]
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    seen, _ = recorded_call(Attention(), mask=mask)
    assert not seen["is_causal"] and seen["attn_mask"] is mask

    # static-cache prefill (no mask, more key slots than queries): the unwritten slots are cut off
    seen, _ = recorded_call(Attention(), lq=5, lk=9)
    assert seen["is_causal"] and seen["key"].shape[2] == 5
    # fewer keys than queries: torch's top-left causal alignment, as a mask
    seen, _ = recorded_call(Attention(), lq=5, lk=3)
    assert not seen["is_causal"] and torch.equal(seen["attn_mask"], torch.ones(5, 3, dtype=torch.bool).tril())

    # float mask: transformers' finfo.min becomes -inf (masked for the temperature's n_i)
    bias = torch.zeros(2, 1, 5, 5)
    bias[..., 0] = torch.finfo(torch.float32).min
    bias[..., 1] = -2.0
    got = recorded_call(Attention(), mask=bias)[0]["attn_mask"]
    assert (got[..., 0] == float("-inf")).all() and (got[..., 1] == -2.0).all() and (got[..., 2:] == 0).all()


def test_position_bias_matches_sdpa() -> None:
    """T5-style position_bias with a padding mask: transformers' sdpa on the rows that see a key."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g).to(DEVICE) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6, generator=g).to(DEVICE)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    mask[1, ..., :2] = False  # left padding: rows 0 and 1 of the second sequence see no key
    module = Attention()
    ours, _ = it_hf.attention_forward(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    ref, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask, scaling=1.0,
                                    position_bias=bias.double())
    low, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    sees = mask.any(-1).transpose(1, 2).expand(2, 6, 4)  # (B, L, H) like the outputs
    assert (ours[~sees] == 0).all()
    assert_within_budget(ours[sees], ref[sees], low[sees].double(), torch.float32)


UNSUPPORTED = {"output_attentions": True, "softcap": 30.0, "s_aux": torch.zeros(4), "sinks": torch.zeros(4),
               "head_mask": torch.ones(4), "cu_seq_lens_q": torch.tensor([0, 2, 5])}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_arguments_raise(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        recorded_call(Attention(), **{name: UNSUPPORTED[name]})
    if name == "cu_seq_lens_q":  # fine when the mask came with them, or for one sequence
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
        recorded_call(Attention(), mask=mask, cu_seq_lens_q=torch.tensor([0, 2, 5]))
        recorded_call(Attention(), cu_seq_lens_q=torch.tensor([0, 5]))


def test_output_attentions_raises_in_a_model() -> None:
    ids, mask = prompt(padded=False)
    with pytest.raises(ValueError, match="output_attentions"):
        logits(tiny_llama(), NAME, ids, mask, output_attentions=True)


BAD = [
    ({"temperature": "infoscal", "train_len": 8}, ValueError, "temperature must be None or one of"),
    ({"temperature": "infoscale"}, ValueError, "needs train_len.*max_position_embeddings \\(2048\\)"),
    ({"temperature": 1.5, "train_len": 8}, ValueError, "temperature must be None or one of"),
    ({"temperature": "logn", "train_len": 1}, ValueError, "train_len must be an int >= 2"),
    ({"temperature": "logn", "train_len": 8.0}, ValueError, "train_len must be an int >= 2"),
    ({"temperature": "logn", "train_len": True}, ValueError, "train_len must be an int >= 2"),
    ({"train_len": 8}, ValueError, "train_len=8 is only used with a string temperature"),
    ({"temperature": torch.ones(3)}, TypeError, "temperature must be a string or None"),
    ({"cos_scale": 0.0}, ValueError, "cos_scale must be None or a finite number > 0"),
    ({"cos_scale": float("inf")}, ValueError, "cos_scale must be None or a finite number > 0"),
    ({"cos_scale": "32"}, ValueError, "cos_scale must be None or a finite number > 0"),
]


@pytest.mark.parametrize("options,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_configure_rejects(options: dict[str, Any], error: type, message: str) -> None:
    config = LlamaConfig()
    with pytest.raises(error, match=message):
        it_hf.configure(config, **options)
    assert getattr(config, it_hf.TEMPERATURE_ATTR, None) is None  # nothing set


def test_configure(tmp_path: Any) -> None:
    with pytest.raises(TypeError, match="config must be a transformers PreTrainedConfig"):
        it_hf.configure({"temperature": "logn"}, temperature="logn", train_len=8)
    config = LlamaConfig()
    assert it_hf.settings(config) == {"temperature": None, "train_len": None, "cos_scale": None}
    assert it_hf.configure(config, temperature="logn", train_len=8, cos_scale=32) is config
    want = {"temperature": "logn", "train_len": 8, "cos_scale": 32.0}
    assert it_hf.settings(config) == want
    config.save_pretrained(tmp_path)  # plain config attributes: saved and loaded
    assert it_hf.settings(LlamaConfig.from_pretrained(tmp_path)) == want
    it_hf.configure(config)  # each call sets all three
    assert it_hf.settings(config) == {"temperature": None, "train_len": None, "cos_scale": None}
    # a composite model's attention layers hold the sub-configs
    composite = it_hf.configure(LlavaConfig(), temperature="infoscale", train_len=16)
    assert it_hf.settings(composite.text_config)["temperature"] == "infoscale"
    # set by hand: checked at call time, with the attribute's name
    module = Attention()
    module.config.infoscale_temperature = "infoscal"
    with pytest.raises(ValueError, match="config.infoscale_temperature must be None or one of"):
        recorded_call(module)


def test_register_is_idempotent() -> None:
    assert it_hf.register() == NAME == "infoscale_triton"
    assert it_hf.register() == NAME
    assert it_hf.register("infoscale_triton_test") == "infoscale_triton_test"
    for name, fn in ((NAME, it_hf.attention_forward), (REFERENCE, it_hf.reference_attention_forward),
                     ("infoscale_triton_test_reference", it_hf.reference_attention_forward)):
        assert AttentionInterface._global_mapping[name] is fn
        assert AttentionMaskInterface._global_mapping[name] is sdpa_mask
    for taken in ("sdpa", "eager", "flash_attention_2"):
        with pytest.raises(ValueError, match=f"name '{taken}' is already registered"):
            it_hf.register(taken)
    with pytest.raises(ValueError, match="'infoscale_triton_reference' is already registered"):
        it_hf.register(REFERENCE)  # would turn the reference into the kernels
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        it_hf.register("")
