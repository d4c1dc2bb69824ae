"""Real bitsandbytes quantization agrees bit for bit with the project's reference NF4."""

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from conftest import tiny_llama
from torch import nn

from mansu.quantize.quantizer import (
    FP4_VALUES,
    NF4_CODE,
    NF4_MIDPOINTS,
    dequantized_state,
    materialize_4bit,
    nf4_codes,
    nf4_dequantize,
    quantize_model,
    quantize_tensor,
    reference_fp4,
    reference_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 100 and (33, 70) end in a partial block; (7, 9) also has an odd last dimension, which sends
# bitsandbytes' CPU dequantization down its generic path.
SHAPES = [(100,), (33, 70), (7, 9), (128, 64)]


def _weights(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Heavy tails and a spread of block scales, so that every code and many absmax values occur.
    w = torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator) ** 3
    return (0.05 * w).to(dtype)


def _bnb_nf4(w, blocksize=64):
    packed, state = bnb_functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=False, quant_type="nf4"
    )
    high_then_low = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1)
    return high_then_low.reshape(-1)[: w.numel()], state


def test_code_tables_are_bitsandbytes_tables():
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_VALUES, bnb_functional.get_4bit_type("fp4", device="cpu").sort().values)
    assert torch.equal(NF4_MIDPOINTS, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_nf4_is_bit_exact(shape, dtype):
    w = _weights(shape, dtype)
    bnb_codes, state = _bnb_nf4(w)
    codes, absmax = nf4_codes(w)
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(absmax, state.absmax)
    # Dequantized in float32 and in the tensor's own dtype (the forward pass uses the latter).
    assert torch.equal(reference_nf4(w), quantize_tensor(w, "nf4"))
    bnb_own_dtype = bnb_functional.dequantize_4bit(
        *bnb_functional.quantize_4bit(w, quant_type="nf4")
    )
    assert torch.equal(reference_nf4(w, dtype=dtype), bnb_own_dtype.reshape(shape))
    assert torch.equal(nf4_dequantize(codes, absmax, shape, dtype), bnb_own_dtype.reshape(shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_fp4_is_bit_exact(dtype):
    w = _weights((33, 70), dtype, seed=1)
    assert torch.equal(reference_fp4(w), quantize_tensor(w, "fp4"))


def test_midpoint_ties_go_to_the_lower_code():
    # One block with absmax 1 (so x = w exactly) and elements lying exactly on the 15 midpoints.
    w = torch.zeros(64)
    w[0] = 1.0
    w[1:16] = NF4_MIDPOINTS
    bnb_codes, _ = _bnb_nf4(w)
    assert bnb_codes[1:16].tolist() == list(range(15))
    assert torch.equal(nf4_codes(w)[0], bnb_codes)
    # Nearest-value rounding (argmin) breaks some of those ties upward: it is not bitsandbytes.
    nearest = (w[1:16, None] - NF4_CODE).abs().argmin(dim=1)
    assert not torch.equal(nearest, torch.arange(15))


def _tiny_llama(dtype=torch.float32):
    """conftest's tiny Llama, 2 layers of width 64 over 96 tokens, in eval mode."""
    return tiny_llama(dtype, vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, max_position_embeddings=32).eval()


@pytest.fixture(scope="module")
def model():
    """A float32 tiny Llama shared by the tests that only read it (quantize_model copies it)."""
    return _tiny_llama()


def _with_weights_replaced(model, new_weights):
    reference = _tiny_llama(next(model.parameters()).dtype)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, weight in new_weights.items():
            reference.get_parameter(name).copy_(weight)
    return reference


LINEAR_WEIGHTS = [
    f"model.layers.{i}.{part}.weight"
    for i in range(2)
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_llama_computes_with_the_reference_nf4_weights(dtype):
    model = _tiny_llama(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_model(model, quant_type="nf4")

    # Quantized from the weights as stored (bf16 stays bf16), forward computes in the model dtype.
    expected = {name: reference_nf4(original[name], dtype=dtype) for name in LINEAR_WEIGHTS}
    reference = _with_weights_replaced(model, expected)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = quantized(tokens).logits
        second = quantized(tokens).logits  # the AVX512-BF16 repack would strike here
        wanted = reference(tokens).logits
    assert torch.equal(first, wanted)
    assert torch.equal(second, wanted)

    layers = dict(quantized.named_modules())
    for name in LINEAR_WEIGHTS:
        layer = layers[name.removesuffix(".weight")]
        assert isinstance(layer, Linear4bit)
        assert layer.weight.quant_type == "nf4" and layer.weight.blocksize == 64
        assert not layer.weight.quant_state.nested
    assert type(quantized.lm_head) is nn.Linear
    assert type(quantized.model.embed_tokens) is nn.Embedding
    assert torch.equal(quantized.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(quantized.model.embed_tokens.weight, original["model.embed_tokens.weight"])
    # The input model is left as it was.
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialized_4bit_model_computes_exactly_what_bitsandbytes_computes(dtype, quant_type):
    model = _tiny_llama(dtype)
    quantized = quantize_model(model, quant_type=quant_type)
    materialized = quantize_model(model, quant_type=quant_type)
    state = materialize_4bit(materialized)

    assert sorted(state) == sorted(LINEAR_WEIGHTS)
    assert all(torch.equal(w, dequantized_state(quantized)[n]) for n, w in state.items())
    assert not any(isinstance(m, Linear4bit) for m in materialized.modules())
    tokens = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(materialized(tokens).logits, quantized(tokens).logits)
    # Gradients to the activations (what EAP-IG and CAD take on Q(θu)) agree as well.
    grads = []
    for m in (quantized, materialized):
        embeds = m.get_input_embeddings()(tokens).detach().requires_grad_(True)
        m(inputs_embeds=embeds).logits.float().logsumexp(-1).sum().backward()
        grads.append(embeds.grad)
    assert torch.equal(*grads)


def test_dequantized_state_is_keyed_like_the_original_weights(model):
    state = dequantized_state(quantize_model(model))
    assert sorted(state) == sorted(LINEAR_WEIGHTS)
    for name, weight in state.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, reference_nf4(model.get_parameter(name)))


def test_fp4_layers_match_the_fp4_reference(model):
    quantized = quantize_model(model, quant_type="fp4")
    assert quantized.model.layers[0].mlp.up_proj.weight.quant_type == "fp4"
    for name, weight in dequantized_state(quantized).items():
        assert torch.equal(weight, reference_fp4(model.get_parameter(name)))


def test_int8_works_on_cpu_with_vectorwise_weights(model):
    quantized = quantize_model(model, quant_type="int8")
    assert isinstance(quantized.model.layers[1].mlp.down_proj, Linear8bitLt)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = quantized(tokens).logits
        full_precision = model(tokens).logits
    # Weights and (in eval mode) activations are int8: close to the float model, not equal.
    assert 0 < (logits - full_precision).abs().max() < 0.05
    state = dequantized_state(quantized)  # after a forward, the int8 weight lives in .state
    for name in LINEAR_WEIGHTS:
        weight = model.get_parameter(name).detach()
        assert torch.equal(state[name], quantize_tensor(weight, "int8"))
        row_absmax = weight.abs().amax(dim=1, keepdim=True)
        # Rounding to fp16 first (as Linear8bitLt does) adds at most a relative 2**-11.
        assert ((state[name] - weight).abs() <= row_absmax / 254 + weight.abs() / 1024).all()


def test_double_quant_reaches_bitsandbytes(model):
    quantized = quantize_model(model, double_quant=True)
    assert quantized.model.layers[0].self_attn.q_proj.weight.quant_state.nested


def test_skip_modules_match_by_dotted_suffix(model):
    quantized = quantize_model(model, skip_modules=("lm_head", "mlp.down_proj"))
    assert type(quantized.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(quantized.model.layers[0].mlp.up_proj, Linear4bit)
    # A bare substring is not a suffix: "proj" skips nothing.
    quantized = quantize_model(model, skip_modules=("lm_head", "proj"))
    assert isinstance(quantized.model.layers[0].mlp.down_proj, Linear4bit)


def test_none_is_an_unquantized_copy(model):
    copy = quantize_model(model, quant_type="none")
    assert copy is not model and dequantized_state(copy) == {}
    assert torch.equal(
        copy.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    )


def test_no_quantizable_layer_is_a_clear_error():
    only_head = nn.Sequential()
    only_head.add_module("embed", nn.Embedding(10, 8))
    only_head.add_module("lm_head", nn.Linear(8, 10))
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize_model(only_head)


def test_unknown_quant_type_is_rejected(model):
    with pytest.raises(ValueError, match="quant_type"):
        quantize_model(model, quant_type="nf3")


def test_bitsandbytes_cpu_bug_for_narrow_rows_is_worked_around_or_refused():
    """bitsandbytes 0.50.2's CPU dequantization of a 2-D 4-bit weight whose last dimension is not a
    multiple of 64 is wrong; quantize_tensor dequantizes flat (exact), quantize_model refuses."""
    import torch
    from torch import nn

    from mansu.quantize.quantizer import quantize_model, quantize_tensor, reference_nf4

    torch.manual_seed(0)
    for shape in [(32, 32), (128, 32), (16, 48)]:
        w = torch.randn(shape)
        assert torch.equal(quantize_tensor(w, "nf4", 64), reference_nf4(w))
    with pytest.raises(ValueError, match="multiple of blocksize=64: 0"):
        quantize_model(nn.Sequential(nn.Linear(32, 64)), skip_modules=())
