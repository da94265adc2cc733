import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX import SummaryWriter

from sepreformer_book import fit
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.fit import (OptimizerConfig, decay_mask, event_tags, make_optimizer, overfit, step,
                                  train_loop)

SAMPLE_RATE = 8000
STEMS = ("a", "b", "c", "d", "e")


def harmonic_batch(batch_size=2, num_samples=2000, seed=0):
    """Five tones per item, one stem silent in the first item: a small, learnable batch."""
    rng = np.random.default_rng(seed)
    time = np.arange(num_samples) / SAMPLE_RATE
    stems = np.stack([[0.2 * np.sin(2 * np.pi * rng.uniform(100, 800) * time) for _ in STEMS]
                      for _ in range(batch_size)]).astype(np.float32)
    stems[0, 4] = 0.0
    active = np.ones((batch_size, len(STEMS)), dtype=bool)
    active[0, 4] = False
    return {"mixture": stems.sum(1), "stems": stems, "present": np.ones_like(active), "active": active}


@pytest.fixture
def tiny_model():
    return SepReformer(PRESETS["ci"], key=jax.random.key(0))


def leaf_names(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_only_touches_weight_matrices(tiny_model):
    params = eqx.filter(tiny_model, eqx.is_inexact_array)
    mask = leaf_names(decay_mask(params))
    decayed = {name for name, flag in mask.items() if flag}
    kept = set(mask) - decayed
    assert any(".conv.weight" in n for n in decayed) and any("linear" in n and n.endswith(".weight") for n in decayed)
    for fragment in (".alpha", ".bias", ".scale1", ".scale2", "norm1.weight", "norm2.weight"):
        assert any(fragment in n for n in kept), fragment
        assert not any(fragment in n for n in decayed), fragment


def test_weight_decay_leaves_masked_parameters_alone(tiny_model):
    """With zero gradients, only decayed leaves move, and they shrink."""
    config = OptimizerConfig(learning_rate=1e-2, weight_decay=0.5)
    optimizer = make_optimizer(config)
    params = eqx.filter(tiny_model, eqx.is_inexact_array)
    state = optimizer.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    updated = leaf_names(eqx.apply_updates(params, updates))
    before = leaf_names(params)
    decayed = leaf_names(decay_mask(params))
    assert any(decayed.values()) and not all(decayed.values())
    for name, leaf in before.items():
        if decayed[name]:
            assert float(jnp.linalg.norm(updated[name])) < float(jnp.linalg.norm(leaf)), name
        else:
            np.testing.assert_array_equal(updated[name], leaf, err_msg=name)


def test_make_optimizer_returns_one_object_per_config():
    assert make_optimizer(OptimizerConfig()) is make_optimizer(OptimizerConfig()) is make_optimizer()
    assert make_optimizer(config=OptimizerConfig()) is make_optimizer()
    assert make_optimizer(OptimizerConfig(learning_rate=1e-3)) is not make_optimizer(OptimizerConfig())


def test_loss_falls_and_step_compiles_once(tiny_model):
    batch = harmonic_batch()
    before, before_update = fit.TRACE_COUNTS["step"], fit.TRACE_COUNTS["update"]
    # A direct step with the default optimizer, then the loop: the loop must reuse the same compiled step.
    probe = SepReformer(PRESETS["ci"], key=jax.random.key(1))
    optimizer = make_optimizer()
    step(probe, optimizer.init(eqx.filter(probe, eqx.is_inexact_array)), batch, optimizer)
    _, _, history = overfit(tiny_model, batch, 12)
    assert fit.TRACE_COUNTS["step"] - before == 1 and fit.TRACE_COUNTS["update"] - before_update == 1
    assert history.loss[-1] < history.loss[0]
    assert np.isfinite(history.grad_norm).all()
    # The silent stem of item 0 is left out of that stem's SI-SDR; item 1 still counts.
    assert np.isfinite(np.stack(history.si_sdr)).all()


def test_two_program_step_matches_the_single_program_step():
    """`step` (forward program + update program) against the plain one-program step: same metrics
    and parameters within float32 rounding, step after step."""
    batch = harmonic_batch()
    optimizer = make_optimizer()
    runs = {}
    for name, update in (("two", step), ("one", fit.single_program_step)):
        model = SepReformer(PRESETS["ci"], key=jax.random.key(3))
        state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        history = []
        for _ in range(4):
            model, state, metrics = update(model, state, batch, optimizer)
            history.append({k: np.asarray(v) for k, v in metrics.items()})
        runs[name] = (eqx.filter(model, eqx.is_array), state, history)
    for a, b in zip(runs["two"][2], runs["one"][2]):
        for key in ("loss", "si_sdr", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for tree in (0, 1):
        pairs = zip(jax.tree.leaves(runs["two"][tree]), jax.tree.leaves(runs["one"][tree]))
        for x, y in pairs:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_lower_step_gives_the_forward_and_update_programs(tiny_model):
    batch = {k: jnp.asarray(v) for k, v in harmonic_batch().items()}
    optimizer = make_optimizer()
    state = optimizer.init(eqx.filter(tiny_model, eqx.is_inexact_array))
    forward, update = fit.lower_step(tiny_model, state, batch, optimizer)
    forward_text, update_text = (p.as_text(dialect="hlo", debug_info=True) for p in (forward, update))
    assert "jvp(vmap(sepreformer))" in forward_text and "transpose(jvp" not in forward_text
    assert "transpose(jvp(vmap(sepreformer)))" in update_text
    single = fit.single_program_step.lower(tiny_model, state, batch, optimizer).lowered
    flops = [p.cost_analysis()["flops"] for p in (forward, update, single)]
    assert min(flops) > 0 and flops[0] + flops[1] == pytest.approx(flops[2], rel=1e-5)  # the same work


def test_schedule_warms_up_and_decays():
    schedule = fit.learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=100))
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_stop_at_target_and_tensorboard_tags(tiny_model, tmp_path):
    batch = harmonic_batch()
    writer = SummaryWriter(str(tmp_path))
    _, _, history = train_loop(tiny_model, itertools.repeat(batch), 5, writer=writer, stem_names=STEMS,
                               sample_rate=SAMPLE_RATE, log_every=2, audio_every=2, stop_at_si_sdr=-1e9, patience=3)
    writer.close()
    assert len(history.step) == 3  # any SI-SDR beats -1e9 dB: stop once it has for `patience` steps
    assert len(history.mean_si_sdr) == 3 and np.isfinite(history.mean_si_sdr).all()
    tags = event_tags(str(tmp_path))
    assert {"loss", "grad_norm", "learning_rate", "si_sdr/a"} <= tags["scalars"]
    assert {"mixture", "true/a", "estimate/e"} <= tags["audio"]


def test_metric_shapes_are_type_checked():
    from beartype import beartype
    from jaxtyping import TypeCheckError, jaxtyped

    batch = harmonic_batch()
    checked = jaxtyped(typechecker=beartype)(fit.stem_si_sdr)
    estimates = jnp.asarray(batch["stems"])
    per_stem = checked(estimates, batch)
    assert per_stem.shape == (len(STEMS),) and np.isfinite(np.asarray(per_stem)).all()
    with pytest.raises(TypeCheckError):
        checked(estimates[0], batch)


def test_zero_steps_returns_empty_history(tiny_model, tmp_path):
    writer = SummaryWriter(str(tmp_path))
    _, _, history = train_loop(tiny_model, iter(()), 3, writer=writer, stem_names=STEMS, sample_rate=SAMPLE_RATE)
    writer.close()
    assert history.step == [] and history.loss == []
