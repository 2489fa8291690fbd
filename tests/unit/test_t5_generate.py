"""T5 greedy generation: identical tokens to transformers' ``generate`` (with and without EOS), cached
decoding equal to uncached greedy decoding with adapters and per-example tasks, one compiled program per
shape, clear errors. The tiny models come from ``test_t5.make_hf_model``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# The tiny models are shared with test_t5.py, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_t5 import CASES, VOCAB, make_hf_model  # noqa: E402

from ept_jax.adapters.base import adapted_linears
from ept_jax.adapters.config import AdapterConfig  # noqa: E402
from ept_jax.adapters.inject import Injection
from ept_jax.checkpoints import load  # noqa: E402
from ept_jax.core.params import AdapterContext  # noqa: E402
from ept_jax.models import t5  # noqa: E402
from ept_jax.models.t5 import generation as t5_generate

N = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{case: (torch model, our model loaded from its save_pretrained directory)}``."""
    out = {}
    for case in CASES:
        hf = make_hf_model(case)
        d = tmp_path_factory.mktemp(f"gen_{case}")
        hf.save_pretrained(d)
        out[case] = (hf, load.from_pretrained(d))
    return out


def prompts(seed=0):
    """Encoder ids ``(3, 9)`` with rows 1 and 2 right padded."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, VOCAB, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 7:] = 0
    return ids * mask, mask


def hf_generate(hf, ids, mask, n, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0,
                          decoder_start_token_id=0).numpy()
    assert (out[:, 0] == 0).all()  # the decoder start token, which ours does not return
    out = out[:, 1:]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=0)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(models, case):
    hf, model = models[case]
    ids, mask = prompts()
    ref = hf_generate(hf, ids, mask, N, eos=None)
    assert max(len(set(row)) for row in ref.tolist()) > 3, "the test model should not repeat one token"
    ours = np.asarray(t5.generate(model, ids, mask, max_new_tokens=N, eos_token_id=None, pad_token_id=0))
    chex.assert_shape(ours, (3, N))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)
    # An EOS first emitted by row 0 mid-way: that row is padded afterwards, by transformers and by us.
    step = next(t for t in range(2, N - 1) if ref[0, t] not in ref[0, :t])
    eos = int(ref[0, step])
    ref_eos = hf_generate(hf, ids, mask, N, eos=eos)
    assert (ref_eos[0, step + 1:] == 0).all() and ref_eos[0, step] == eos
    ours_eos = np.asarray(t5.generate(model, ids, mask, max_new_tokens=N, eos_token_id=[eos], pad_token_id=0))
    np.testing.assert_array_equal(ours_eos, ref_eos)


def test_cached_generation_with_adapters_equals_uncached_greedy(models, tmp_path):
    hf, plain = models["v1_1"]
    hf.save_pretrained(tmp_path)
    inj = Injection(AdapterConfig(kind="lora", r=4, alpha=8.0, dropout=0.0), targets=("k", "v"))
    model = load.from_pretrained(tmp_path, injection=inj)
    # Adapted keys/values reach both caches: decoder self-attention (filled step by step) and cross-attention
    # (computed once from the encoder states).
    for i, (_, lin) in enumerate(adapted_linears(model)):  # non-zero, different per Linear
        shape = lin.adapter.B[...].shape
        lin.adapter.B[...] = 0.2 * jnp.cos(jnp.arange(np.prod(shape)) + i).reshape(shape)
    ids, mask = prompts(1)
    ctx = AdapterContext(task_ids=jnp.asarray([1, 0, 1]))
    ours = np.asarray(t5.generate(model, ids, mask, ctx, max_new_tokens=N))
    # Reference: the uncached forward over a fixed-size decoder buffer (causal, so position t only sees tokens
    # <= t and the buffer's not-yet-generated tail does not matter), taking position t's argmax at step t.
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda st, dec: nnx.merge(graphdef, st)(ids, mask, dec, ctx=ctx))
    buffer = np.zeros((3, N), np.int32)  # column 0 is the decoder start token
    expected = []
    for t in range(N):
        expected.append(np.asarray(jnp.argmax(decode(state, jnp.asarray(buffer))[:, t], axis=-1)))
        if t + 1 < N:
            buffer[:, t + 1] = expected[-1]
    np.testing.assert_array_equal(ours, np.stack(expected, axis=1))
    base = np.asarray(t5.generate(plain, ids, mask, None, max_new_tokens=N))
    assert (base != ours).any(), "the adapters should change what is generated"


def test_generate_compiles_once_per_shape(models, tmp_path):
    hf, model = models["v1_1"]
    ids, mask = prompts()
    fn = t5_generate._generate_jit
    t5.generate(model, ids, mask, max_new_tokens=N, eos_token_id=1)
    compiled = fn._cache_size()
    # New prompts, new special-token ids (any number of EOS ids up to 4) and new weights of the same shapes
    # reuse the compiled program.
    hf.save_pretrained(tmp_path)
    model2 = load.from_pretrained(tmp_path)
    model2.decoder.final_layer_norm.weight[...] = model2.decoder.final_layer_norm.weight[...] * -1.0
    ids2, mask2 = prompts(seed=3)
    a = t5.generate(model, ids2, mask2, max_new_tokens=N, eos_token_id=5, pad_token_id=3)
    b = t5.generate(model2, ids2, mask2, max_new_tokens=N, eos_token_id=[6, 7], pad_token_id=3,
                    decoder_start_token_id=2)
    t5.generate(model, ids2, mask2, max_new_tokens=N)
    assert fn._cache_size() == compiled
    assert a.shape == b.shape == (3, N) and (np.asarray(a) != np.asarray(b)).any()
    t5.generate(model, ids, mask, max_new_tokens=N + 1)
    assert fn._cache_size() == compiled + 1


def test_generate_rejects_bad_inputs(models):
    _, model = models["v1_0"]
    ids, mask = prompts()
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        t5.generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_id='1'"):
        t5.generate(model, ids, mask, max_new_tokens=2, eos_token_id="1")
    with pytest.raises(ValueError, match="eos_token_id=-2"):
        t5.generate(model, ids, mask, max_new_tokens=2, eos_token_id=-2)
    with pytest.raises(ValueError, match="pad_token_id=-1"):
        t5.generate(model, ids, mask, max_new_tokens=2, pad_token_id=-1)
    with pytest.raises(ValueError, match="attention_mask shape"):
        t5.generate(model, ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be integer"):
        t5.generate(model, ids[0], None, max_new_tokens=2)
