"""benchmarks/bench_backward_forms.py times hand-written backward passes against autodiff's and the book's: each must
give the same gradients, or its timing would compare different computations."""

import functools
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_backward_forms as forms  # noqa: E402

from sepreformer_book.dual_path import DualPathBlock  # noqa: E402
from sepreformer_book.model import PRESETS  # noqa: E402


def _gradients(block, frames):
    """Gradients of a scalar of a dual-path block's output with respect to its parameters and input, and the text
    of the program computing them."""
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(p, x):
        out = eqx.combine(p, static)(x)
        return jnp.sum(jnp.sin(3.0 * out) * out)

    gradient = jax.grad(loss, argnums=(0, 1))
    return jax.tree.leaves(jax.jit(gradient)(params, frames)), str(jax.make_jaxpr(gradient)(params, frames))


@functools.cache
def _case():
    """A ci-sized dual-path block (attention within and across chunks, the last chunk padded) with LayerScale at 1
    rather than 1e-4, so that attention and the feed-forward shape the gradients; its frames; the plain
    gradients."""
    config = PRESETS["ci"]
    block = DualPathBlock(config.dim, config.num_heads, config.ff_dim, config.chunk_size, key=jax.random.key(1))
    scales = lambda b: [s for t in (b.intra_block, b.inter_block) for s in (t.scale1, t.scale2)]
    block = eqx.tree_at(scales, block, [jnp.ones_like(s) for s in scales(block)])
    frames = jax.random.normal(jax.random.key(2), (3 * config.chunk_size + 5, config.dim))
    return block, frames, _gradients(block, frames)


@pytest.mark.parametrize("variant", [name for name in forms.VARIANTS if name != "plain"])
def test_every_backward_form_gives_the_plain_gradients(variant):
    block, frames, (plain, plain_program) = _case()
    with forms.VARIANTS[variant]():
        changed, program = _gradients(block, frames)
    assert program != plain_program, f"{variant} left the program as it was"
    assert len(plain) == len(changed)
    for expected, got in zip(plain, changed):
        scale = float(jnp.max(jnp.abs(expected))) + 1e-12
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5 * scale)


def test_a_wrong_backward_form_is_caught():
    """The comparison above can fail: attention's backward with dV dropped gives other gradients."""

    def without_value_gradient(saved, d_out):
        d_q, d_k, d_v, d_valid = forms._attention_backward_einsum(saved, d_out)
        return d_q, d_k, jnp.zeros_like(d_v), d_valid

    block, frames, (plain, _) = _case()
    with forms._replaced("_softmax_attention", forms._attention_with(without_value_gradient)):
        changed, _ = _gradients(block, frames)
    assert any(not np.allclose(a, b, rtol=1e-4, atol=0) for a, b in zip(plain, changed))
