"""Tests of the model modules: conv, snake, dual_path and model (chapters 02-05). Small sizes; CPU; fast."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from beartype import beartype
from jaxtyping import Array, Float, TypeCheckError, jaxtyped

from sepreformer_book.conv import Decoder, Encoder, frame_count, overlap_add, padded_length, strided_windows
from sepreformer_book.dual_path import (DualPathBlock, ThroughEquinox, TransformerBlock, apply_rowwise,
                                        chunk_validity, dual_path_reference, feedforward,
                                        grouped_rope_attention, project_qkv, rope_attention,
                                        rope_attention_reference, rope_tables, softmax_attention,
                                        vmapped_grouped)
from sepreformer_book.model import (PRESETS, ModelConfig, SepReformer, SplitLayer, forward_flops,
                                    model_config_for, parameter_count)
from sepreformer_book.snake import Snake, reduced_sin_cos, snake

CI = PRESETS["ci"]


@pytest.fixture(scope="module")
def ci_model():
    return SepReformer(CI, key=jax.random.key(0))


# ---- conv ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [16, 17, 23, 24, 101, 1000])
def test_frame_count_matches_encoder(num_samples):
    encoder = Encoder(4, 16, 8, key=jax.random.key(0))
    assert encoder(jnp.zeros(num_samples)).shape == (frame_count(num_samples, 16, 8), 4)


@pytest.mark.parametrize("num_samples", [1, 15, 16, 17, 24, 25, 1001])
def test_padded_length_tiles_and_decoder_returns_it(num_samples):
    padded = padded_length(num_samples, 16, 8)
    assert padded >= max(num_samples, 16) and (padded - 16) % 8 == 0 and padded - 8 < max(num_samples, 16)
    frames = frame_count(padded, 16, 8)
    assert Decoder(4, 16, 8, key=jax.random.key(0))(jnp.zeros((frames, 4))).shape == (padded,)


def test_frame_count_rejects_short_input():
    with pytest.raises(ValueError, match="kernel_size"):
        frame_count(3, 16, 8)


@pytest.mark.parametrize("kernel_size, stride", [(16, 8), (32, 16), (12, 4), (8, 8)])
def test_encoder_and_decoder_products_equal_their_convolution_layers(kernel_size, stride):
    encoder = Encoder(6, kernel_size, stride, key=jax.random.key(0))
    decoder = Decoder(6, kernel_size, stride, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (padded_length(203, kernel_size, stride),))
    windows = jaxtyped(typechecker=beartype)(strided_windows)(x, kernel_size, stride)
    assert windows.shape == (frame_count(x.shape[0], kernel_size, stride), kernel_size)
    np.testing.assert_allclose(encoder(x),  # __call__ is jaxtyped
                               jax.nn.gelu(encoder.conv(x[None])).T, atol=1e-6)
    h = jax.random.normal(jax.random.key(3), (25, 6))
    np.testing.assert_allclose(decoder(h), decoder.conv_t(h.T)[0], atol=1e-5)
    # and in the gradient of every weight
    loss = lambda layers, apply: jnp.sum(jnp.sin(apply(layers, x)))
    ours = eqx.filter_grad(loss)((encoder, decoder), lambda p, v: p[1](p[0](v)))
    layers = eqx.filter_grad(loss)((encoder, decoder),
                                   lambda p, v: p[1].conv_t(jax.nn.gelu(p[0].conv(v[None])))[0])
    _assert_trees_close(ours, layers, rtol=1e-4, atol=1e-5)


def test_strided_windows_and_overlap_add_refuse_a_kernel_that_is_not_a_multiple_of_the_stride():
    with pytest.raises(ValueError, match="not a multiple of stride=4"):
        strided_windows(jnp.zeros(30), 10, 4)
    with pytest.raises(ValueError, match="not a multiple of stride=4"):
        overlap_add(jnp.zeros((3, 10)), 4)
    encoder = Encoder(3, 10, 4, key=jax.random.key(0))  # falls back to the convolution layer
    x = jnp.arange(30.0)
    np.testing.assert_allclose(encoder(x), jax.nn.gelu(encoder.conv(x[None])).T, atol=1e-6)


def test_encoder_decoder_accept_numpy_ints():
    assert Encoder(4, np.int64(16), np.int64(8), key=jax.random.key(0)).stride == 8


# ---- snake ---------------------------------------------------------------------------------------------------------
def test_snake_matches_definition_and_is_safe_at_zero_alpha():
    x = jnp.linspace(-3, 3, 61)
    for alpha in [0.3, 1.0, 5.0, -2.0]:
        np.testing.assert_allclose(snake(x, jnp.float32(alpha)), x + jnp.sin(alpha * x) ** 2 / alpha, atol=1e-5)
    for alpha in [0.0, -1e-6, 1e-30]:
        value, grad = jax.value_and_grad(lambda a: jnp.sum(snake(x, a)))(jnp.float32(alpha))
        assert np.isfinite(value) and np.isfinite(grad)
        np.testing.assert_allclose(grad, jnp.sum(x**2), rtol=1e-4)  # d/da sin^2(ax)/a -> x^2 as a -> 0


def test_reduced_sin_cos_gives_sin_squared_and_sin_2z_to_float32_accuracy():
    z = jnp.linspace(-1000, 1000, 200_001, dtype=jnp.float32)
    z64 = np.asarray(z, np.float64)
    sin_r, cos_r = (np.asarray(v, np.float64) for v in jaxtyped(typechecker=beartype)(reduced_sin_cos)(z))
    assert np.max(np.abs(sin_r**2 - np.sin(z64) ** 2)) < 1e-6
    assert np.max(np.abs(2 * sin_r * cos_r - np.sin(2 * z64))) < 1e-6


def test_snake_hand_written_derivatives_match_autodiff_of_the_textbook_form():
    x = jax.random.normal(jax.random.key(0), (50, 4)) * 3
    alpha = jnp.array([0.3, 1.0, 2.5, -1.5], jnp.float32)
    textbook = lambda v, a: jnp.sum(jnp.tanh(v + jnp.sin(a * v) ** 2 / a))  # a non-linear loss on top
    ours = lambda v, a: jnp.sum(jnp.tanh(jaxtyped(typechecker=beartype)(snake)(v, a)))
    for got, want in zip(jax.grad(ours, (0, 1))(x, alpha), jax.grad(textbook, (0, 1))(x, alpha)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    second = jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(snake(u, alpha)))(v)))(x)  # d2/dx2 = 2 alpha cos 2 alpha x
    np.testing.assert_allclose(second, 2 * alpha * jnp.cos(2 * alpha * x), atol=1e-4)


def test_snake_per_channel_alpha_dtype():
    act = Snake(3)
    assert act.alpha.shape == (3,) and act.alpha.dtype == jnp.float32 and not act.alpha.aval.weak_type
    act = eqx.tree_at(lambda m: m.alpha, act, jnp.array([0.5, 1.0, 0.0], jnp.float32))
    np.testing.assert_allclose(act(jnp.ones((2, 3)))[0], [1 + np.sin(0.5) ** 2 / 0.5, 1 + np.sin(1.0) ** 2, 1.0],
                               rtol=1e-6)


# ---- dual path -----------------------------------------------------------------------------------------------------
def _loud(block):
    ones = jnp.ones_like(block.intra_block.scale1)
    return eqx.tree_at(lambda b: [b.intra_block.scale1, b.intra_block.scale2, b.inter_block.scale1,
                                  b.inter_block.scale2], block, [ones] * 4)


@pytest.mark.parametrize("num_frames", [5, 8, 9, 27])
def test_dual_path_equals_loop_reference(num_frames):
    block = _loud(DualPathBlock(16, 2, 32, chunk_size=8, key=jax.random.key(1)))
    x = jax.random.normal(jax.random.key(num_frames), (num_frames, 16))
    np.testing.assert_allclose(eqx.filter_jit(lambda b, v: b(v))(block, x), dual_path_reference(block, x), atol=1e-4)


def _old_dual_path(block, x):
    """The dual-path block as the book first wrote it: vmap over chunks, transpose to slots, vmap again."""
    num_frames, channels = x.shape
    valid = chunk_validity(num_frames, block.chunk_size)
    chunks = jnp.pad(x, ((0, valid.size - num_frames), (0, 0))).reshape(*valid.shape, channels)
    chunks = jax.vmap(block.intra_block)(chunks, jnp.asarray(valid))
    slots = jax.vmap(block.inter_block)(jnp.transpose(chunks, (1, 0, 2)), jnp.asarray(valid.T))
    return jnp.transpose(slots, (1, 0, 2)).reshape(-1, channels)[:num_frames]


@pytest.mark.parametrize("num_frames", [8, 27])
def test_dual_path_equals_the_vmapped_form_in_value_and_gradient(num_frames):
    block = _loud(DualPathBlock(16, 2, 32, chunk_size=8, key=jax.random.key(3)))
    x = jax.random.normal(jax.random.key(num_frames), (num_frames, 16))
    np.testing.assert_allclose(block(x), eqx.filter_jit(_old_dual_path)(block, x), atol=1e-5)
    loss = lambda apply: eqx.filter_jit(eqx.filter_grad(lambda b, v: jnp.sum(jnp.sin(apply(b, v)))))(block, x)
    _assert_trees_close(loss(lambda b, v: b(v)), loss(_old_dual_path), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_grouped_attention_equals_vmapped_sequences(axis):
    block = TransformerBlock(16, 2, 32, key=jax.random.key(4), layer_scale=1.0)
    x = jax.random.normal(jax.random.key(5), (5, 7, 16))
    valid = jnp.ones((5, 7), bool).at[-1, 4:].set(False)
    grouped = jaxtyped(typechecker=beartype)(grouped_rope_attention)
    per_sequence = lambda s, v: rope_attention(block.attn, s, v)
    np.testing.assert_allclose(grouped(block.attn, x, valid, axis),
                               vmapped_grouped(per_sequence, x, valid, axis), atol=1e-5)
    np.testing.assert_allclose(block.grouped(x, valid, axis), vmapped_grouped(block, x, valid, axis), atol=1e-5)
    with pytest.raises(ValueError, match="axis must be 0 or 1"):
        grouped_rope_attention(block.attn, x, valid, 2)


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_attention_backward_equals_autodiff(masked):
    q, k, v = jax.random.normal(jax.random.key(6), (3, 4, 2, 9, 8))
    valid = jnp.ones((4, 1, 1, 9), bool).at[-1, ..., 6:].set(False) if masked else None

    def by_autodiff(q, k, v):
        logits = q @ jnp.swapaxes(k, -1, -2)
        logits = logits if valid is None else jnp.where(valid, logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1) @ v

    checked = jaxtyped(typechecker=beartype)(softmax_attention)
    np.testing.assert_allclose(checked(q, k, v, valid), by_autodiff(q, k, v), atol=1e-6)
    d_out = jax.random.normal(jax.random.key(7), q.shape)
    ours = jax.vjp(lambda *a: softmax_attention(*a, valid), q, k, v)[1](d_out)
    theirs = jax.vjp(by_autodiff, q, k, v)[1](d_out)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5)
    if masked:  # a masked key gets no gradient
        assert float(jnp.max(jnp.abs(ours[1][-1, ..., 6:, :]))) == 0.0


def test_padding_values_do_not_reach_real_frames():
    block = _loud(DualPathBlock(16, 2, 32, chunk_size=8, key=jax.random.key(2)))
    x = jax.random.normal(jax.random.key(0), (11, 16))
    valid = chunk_validity(11, 8)
    garbage = jnp.pad(x, ((0, 5), (0, 0)), constant_values=7.0).reshape(2, 8, 16)
    masked = jax.vmap(block.intra_block)(garbage, jnp.asarray(valid))
    clean = jax.vmap(block.intra_block)(jnp.pad(x, ((0, 5), (0, 0))).reshape(2, 8, 16), jnp.asarray(valid))
    np.testing.assert_allclose(masked.reshape(16, 16)[:11], clean.reshape(16, 16)[:11], atol=1e-5)


def test_transformer_block_layer_scale_is_strongly_typed_float32():
    block = TransformerBlock(16, 2, 32, key=jax.random.key(0))
    for scale in (block.scale1, block.scale2):
        assert scale.dtype == jnp.float32 and not scale.aval.weak_type
    assert isinstance(feedforward(16, 32, key=jax.random.key(0)).layers[1], Snake)


def test_transformer_block_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerBlock(18, 4, 32, key=jax.random.key(0))


# ---- model ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [1, 15, 17, 100, 263, 1001])
def test_output_length_equals_input_length(ci_model, num_samples):
    out = eqx.filter_jit(lambda m, v: m(v))(ci_model, jnp.ones(num_samples))
    assert out.shape == (CI.num_stems, num_samples) and bool(jnp.isfinite(out).all())


def test_shapes_are_type_checked(ci_model):
    @jaxtyped(typechecker=beartype)
    def separate(model: SepReformer, x: Float[Array, " T"]) -> Float[Array, "5 T"]:
        return model(x)

    assert eqx.filter_jit(separate)(ci_model, jnp.zeros(40)).shape == (5, 40)
    with pytest.raises(TypeCheckError):
        ci_model(jnp.zeros((2, 40)))  # batched input: vmap outside instead
    with pytest.raises(TypeCheckError):
        ci_model.split(jnp.zeros(16))
    with pytest.raises(TypeCheckError):
        ci_model.sep_blocks[0](jnp.zeros((3, 4, 16)))


def test_split_layer_static_num_stems():
    split = SplitLayer(8, 3, key=jax.random.key(0))
    assert split(jnp.ones((7, 8))).shape == (3, 7, 8)
    assert 3 not in [x for x in jax.tree_util.tree_leaves(split) if not hasattr(x, "shape")]  # static, not a leaf


def test_gradients_finite(ci_model):
    x = jax.random.normal(jax.random.key(0), (2, 203))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.mean(jax.vmap(m)(x) ** 2)))(ci_model)
    leaves = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array))
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_serialise_round_trip(ci_model, tmp_path):
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, ci_model)
    restored = eqx.tree_deserialise_leaves(path, SepReformer(CI, key=jax.random.key(99)))
    x = jnp.linspace(-1, 1, 77)
    forward = eqx.filter_jit(lambda m, v: m(v))
    np.testing.assert_array_equal(forward(ci_model, x), forward(restored, x))


def test_one_compile_across_updates(ci_model):
    traces = []
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(eqx.filter(ci_model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, mixture):
        traces.append(1)  # runs only while tracing
        loss, grads = eqx.filter_value_and_grad(lambda m: jnp.mean(jax.vmap(m)(mixture) ** 2))(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    model, mixture = ci_model, jax.random.normal(jax.random.key(1), (2, 200))
    for _ in range(4):
        model, opt_state, loss = step(model, opt_state, mixture)
    assert len(traces) == 1 and np.isfinite(float(loss))


def test_full_preset_has_seed_parameter_count():
    skeleton = eqx.filter_eval_shape(SepReformer, PRESETS["full"], key=jax.random.key(0))
    assert 6.7e6 < parameter_count(skeleton) < 6.9e6


def test_book_preset_size_and_profiles():
    book = PRESETS["book"]  # the seed's width at 8 kHz, half the frames, one reconstruction block (chapter 5)
    assert (book.dim, book.stride, book.kernel_size, book.num_sep_blocks, book.num_rec_blocks) == (64, 16, 32, 2, 1)
    model = eqx.filter_eval_shape(SepReformer, book, key=jax.random.key(0))
    assert 0.30e6 < parameter_count(model) < 0.36e6
    for name in ("ci", "book", "full"):
        assert model_config_for(name) == PRESETS[name]


def test_forward_flops_positive_and_grow_with_length():
    assert 0 < forward_flops(CI, 400) < forward_flops(CI, 800)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="chunk_size"):
        ModelConfig(chunk_size=0)
    with pytest.raises(TypeError, match="ModelConfig"):
        SepReformer("book", key=jax.random.key(0))


def _assert_trees_close(a, b, **tolerances):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, **tolerances)


@pytest.mark.parametrize("layer", [feedforward(16, 32, key=jax.random.key(0)), eqx.nn.LayerNorm(16),
                                   eqx.nn.LayerNorm(16, use_weight=False, use_bias=False)],
                         ids=["feedforward", "layernorm", "bare-layernorm"])
def test_apply_rowwise_equals_vmap_in_value_and_gradient(layer):
    layer = jax.tree_util.tree_map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape) / v.size,
                                   layer)  # not the initial all-ones/zeros weights, which would hide a transposition
    frames = jax.random.normal(jax.random.key(1), (37, 16)) * 2 + 0.5
    checked = jaxtyped(typechecker=beartype)(apply_rowwise)
    np.testing.assert_allclose(checked(layer, frames), jax.vmap(layer)(frames), atol=1e-5)
    loss = lambda apply: eqx.filter_grad(lambda m, x: jnp.sum(jnp.sin(apply(m, x))))(layer, frames)
    if jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array)):
        _assert_trees_close(loss(apply_rowwise), loss(lambda m, x: jax.vmap(m)(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padded", [0, 3])
def test_rope_attention_equals_equinox_attention_with_rope_in_process_heads(padded):
    block = TransformerBlock(16, 2, 32, key=jax.random.key(2))
    frames = jax.random.normal(jax.random.key(3), (11, 16))
    valid = None if not padded else jnp.arange(11) < 11 - padded
    ours = jaxtyped(typechecker=beartype)(rope_attention)
    q, k, v = jaxtyped(typechecker=beartype)(project_qkv)(block.attn, frames)
    np.testing.assert_allclose(v, jax.vmap(block.attn.value_proj)(frames), atol=1e-5)
    np.testing.assert_allclose(ours(block.attn, frames, valid), rope_attention_reference(block.attn, block.rope, frames, valid),
                               atol=1e-5)
    grad = lambda f: eqx.filter_grad(lambda a, x: jnp.sum(jnp.sin(f(a, x))))(block.attn, frames)
    _assert_trees_close(grad(lambda a, x: rope_attention(a, x, valid)),
                        grad(lambda a, x: rope_attention_reference(a, block.rope, x, valid)), rtol=1e-4, atol=1e-5)
    if padded:  # a padded key changes nothing
        moved = frames.at[-1].set(100.0)
        np.testing.assert_allclose(rope_attention(block.attn, moved, valid)[:-padded],
                                   rope_attention(block.attn, frames, valid)[:-padded], atol=1e-5)


def test_through_equinox_computes_the_same_block():
    block = TransformerBlock(16, 2, 32, key=jax.random.key(5), layer_scale=1.0)
    frames = jax.random.normal(jax.random.key(6), (3, 9, 16))
    valid = jnp.arange(9) < 7
    wrapped = ThroughEquinox(block)
    np.testing.assert_allclose(jax.vmap(wrapped, (0, None))(frames, valid), jax.vmap(block, (0, None))(frames, valid),
                               atol=1e-5)


def test_rope_tables_match_equinox_rotary_embedding():
    rope = eqx.nn.RotaryPositionalEmbedding(8)
    x = jax.random.normal(jax.random.key(4), (20, 8))
    cos, sin = jaxtyped(typechecker=beartype)(rope_tables)(20, 8, rope.theta)
    turned = jnp.concatenate([-x[:, 4:], x[:, :4]], axis=-1)
    np.testing.assert_allclose(x * cos + turned * sin, rope(x), atol=1e-5)
