"""The PyTorch port in benchmarks/peer_torch.py computes what the JAX library computes: the same outputs, loss,
gradients, optimizer updates and windowed separation from the same weights (skipped without PyTorch:
`pip install -e ".[peer]"`)."""

import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_torch as pt  # noqa: E402

from sepreformer_book import fit  # noqa: E402
from sepreformer_book.dual_path import TransformerBlock  # noqa: E402
from sepreformer_book.inference import frame_grid, separate_long, window_sizes  # noqa: E402
from sepreformer_book.model import PRESETS, SepReformer  # noqa: E402
from sepreformer_book.snake import SMALL_ALPHA, Snake  # noqa: E402

SAMPLE_RATE = 8000


def loud(model, seed=0):
    """The model with every LayerScale and Snake frequency drawn at random (a few alphas 0 or tiny, some negative),
    so that every sub-layer shows in the output and the small-alpha branch is used."""
    rng = np.random.default_rng(seed)

    def scales(block):
        draw = lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape).astype(np.float32))
        return eqx.tree_at(lambda b: (b.scale1, b.scale2), block, (draw(block.scale1), draw(block.scale2)))

    def alphas(snake):
        alpha = rng.uniform(-2.0, 2.0, snake.alpha.shape).astype(np.float32)
        alpha[:3] = (0.0, 0.1 * SMALL_ALPHA, -0.5 * SMALL_ALPHA)
        return eqx.tree_at(lambda s: s.alpha, snake, jnp.asarray(alpha))

    for kind, change in ((TransformerBlock, scales), (Snake, alphas)):
        model = jax.tree_util.tree_map(lambda n: change(n) if isinstance(n, kind) else n, model,
                                       is_leaf=lambda n: isinstance(n, kind))
    return model


def make_batch(batch_size=2, seconds=1.0, seed=0):
    """batch_size x seconds of noise stems at 8 kHz; one stem silent (inactive) and one absent."""
    rng = np.random.default_rng(seed)
    stems = (0.1 * rng.standard_normal((batch_size, 5, int(seconds * SAMPLE_RATE)))).astype(np.float32)
    active, present = np.ones((batch_size, 5), bool), np.ones((batch_size, 5), bool)
    stems[0, 1], active[0, 1] = 0.0, False
    stems[-1, 3], active[-1, 3], present[-1, 3] = 0.0, False, False
    return {"mixture": stems.sum(1), "stems": stems, "active": active, "present": present}


@pytest.fixture(scope="module")
def ci_case():
    torch.manual_seed(0)
    model = loud(SepReformer(PRESETS["ci"], key=jax.random.key(0)))
    batch = make_batch()
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    (loss, estimates), grads = eqx.filter_value_and_grad(fit.batch_loss, has_aux=True)(model, jax_batch)
    port = pt.from_jax(model)
    tb = pt.torch_batch(batch)
    port_estimates = port(tb["mixture"])
    port_loss = pt.batch_composite_loss(port_estimates, tb["stems"], tb["active"], tb["present"])
    port_loss.backward()
    return dict(model=model, batch=batch, loss=float(loss), estimates=np.asarray(estimates), grads=grads,
                port=port, port_loss=float(port_loss.detach()), port_estimates=port_estimates.detach().numpy())


def test_the_port_has_the_models_parameters(ci_case):
    port, model = ci_case["port"], ci_case["model"]
    count = sum(p.numel() for p in port.parameters())
    assert count == sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))
    for name, array in pt.jax_layout(model).items():
        np.testing.assert_array_equal(dict(port.named_parameters())[name].detach().numpy(), array, err_msg=name)


def test_forward_agrees(ci_case):
    difference = np.max(np.abs(ci_case["port_estimates"] - ci_case["estimates"]))
    scale = np.max(np.abs(ci_case["estimates"]))
    print(f"ci forward: max |torch - JAX| = {difference:.2e} (outputs up to {scale:.2f})")
    assert difference <= 1e-5 * max(scale, 1.0)


def test_loss_agrees(ci_case):
    print(f"ci loss: JAX {ci_case['loss']:.7f}, torch {ci_case['port_loss']:.7f}")
    assert ci_case["port_loss"] == pytest.approx(ci_case["loss"], rel=1e-5)


def test_gradients_agree(ci_case):
    port = dict(ci_case["port"].named_parameters())
    worst = 0.0
    for name, expected in pt.jax_layout(ci_case["grads"]).items():
        got = port[name].grad.numpy()
        relative = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-12)
        assert relative < 1e-4, f"{name}: relative gradient difference {relative:.2e}"
        worst = max(worst, relative)
    print(f"ci gradients: worst per-tensor relative difference {worst:.2e}")


@pytest.mark.parametrize("config", [
    fit.OptimizerConfig(),  # the default make_optimizer(): constant 3e-4
    fit.OptimizerConfig(learning_rate=2e-3, warmup_steps=2, clip_norm=1e6),  # clipping inactive, warmup
    fit.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, decay_steps=4, clip_norm=0.01, weight_decay=0.5),
])
def test_optimizer_updates_agree(ci_case, config):
    """Three updates from the same gradients: clipping, AdamW, the decay mask and the schedule."""
    model, grads = ci_case["model"], eqx.filter(ci_case["grads"], eqx.is_inexact_array)
    optimizer = fit.make_optimizer(config)
    params = eqx.filter(model, eqx.is_inexact_array)
    state = optimizer.init(params)
    port = pt.from_jax(model)
    peer = pt.PeerOptimizer(port, config)
    torch_grads = pt.jax_layout(grads)
    for _ in range(3):
        updates, state = optimizer.update(grads, state, params)
        params = eqx.apply_updates(params, updates)
        for name, param in port.named_parameters():
            param.grad = torch.from_numpy(torch_grads[name].copy())
        norm = peer.step()
        assert float(norm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    got = dict(port.named_parameters())
    for name, expected in pt.jax_layout(params).items():
        np.testing.assert_allclose(got[name].detach().numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("config", [fit.OptimizerConfig(), fit.OptimizerConfig(warmup_steps=5),
                                    fit.OptimizerConfig(warmup_steps=3, decay_steps=10),
                                    fit.OptimizerConfig(decay_steps=7)])
def test_learning_rate_schedule_agrees(config):
    schedule = fit.learning_rate_schedule(config)
    for count in range(15):
        assert pt.learning_rate(config, count) == pytest.approx(float(schedule(count)), rel=1e-6, abs=1e-12)


def test_training_step_agrees(ci_case):
    """`fit.step` and the port's step from the same weights and batch: metrics and updated weights."""
    model, batch = ci_case["model"], ci_case["batch"]
    optimizer = fit.make_optimizer()
    port = pt.from_jax(model)
    train_step = pt.make_train_step(port, pt.PeerOptimizer(port))
    copy = jax.tree_util.tree_map(lambda x: jnp.array(x) if eqx.is_array(x) else x, model)  # step donates
    new_model, _, metrics = fit.step(copy, optimizer.init(eqx.filter(copy, eqx.is_inexact_array)), batch, optimizer)
    port_metrics = train_step(pt.torch_batch(batch))
    assert float(port_metrics["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-5)
    assert float(port_metrics["grad_norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-4)
    np.testing.assert_allclose(port_metrics["si_sdr"].numpy(), np.asarray(metrics["si_sdr"]), rtol=1e-4, atol=1e-4)
    # Adam's first update is lr * g / (|g| + eps), about +-lr however small g is: an element whose gradient is near 0
    # (within the two gradients' float32 difference) can move either way. All must be within 2 lr, nearly all close.
    got, lr = dict(port.named_parameters()), fit.OptimizerConfig().learning_rate
    differences = np.concatenate([np.abs(got[name].detach().numpy() - expected).ravel()
                                  for name, expected in pt.jax_layout(new_model).items()])
    assert differences.max() <= 2.01 * lr
    assert np.mean(differences > 0.05 * lr) < 1e-3


def test_windowed_separation_agrees(ci_case):
    model, port = ci_case["model"], ci_case["port"]
    song = (0.1 * np.random.default_rng(1).standard_normal(3 * SAMPLE_RATE)).astype(np.float32)
    window, overlap = window_sizes(0.5, 0.0625, SAMPLE_RATE, frame_grid(model))
    expected = separate_long(model, song, window_samples=window, overlap_samples=overlap, batch_windows=4)
    got = pt.separate_long(port, song, window_samples=window, overlap_samples=overlap, batch_windows=4)
    difference = np.max(np.abs(got - expected))
    print(f"ci windowed separation: max |torch - JAX| = {difference:.2e}")
    assert got.shape == expected.shape and difference <= 1e-5 * max(np.max(np.abs(expected)), 1.0)


def test_book_forward_agrees():
    model = loud(SepReformer(PRESETS["book"], key=jax.random.key(1)), seed=1)
    mixture = make_batch()["mixture"]
    expected = np.asarray(fit.separate_batch(model, mixture))
    with torch.inference_mode():
        got = pt.from_jax(model)(torch.from_numpy(mixture)).numpy()
    difference, scale = np.max(np.abs(got - expected)), np.max(np.abs(expected))
    print(f"book forward: max |torch - JAX| = {difference:.2e} (outputs up to {scale:.2f})")
    assert difference <= 1e-5 * max(scale, 1.0)


def test_forward_agrees_when_the_chunks_tile(ci_case):
    """A length whose frames fill the chunks exactly: the unmasked path of the dual-path blocks."""
    config = PRESETS["ci"]
    samples = (4 * config.chunk_size * 16 - 1) * config.stride + config.kernel_size  # 1024 frames, 64 chunks of 16
    mixture = (0.1 * np.random.default_rng(2).standard_normal((1, samples))).astype(np.float32)
    expected = np.asarray(fit.separate_batch(ci_case["model"], mixture))
    with torch.inference_mode():
        got = ci_case["port"](torch.from_numpy(mixture)).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-5 * max(np.max(np.abs(expected)), 1.0)
