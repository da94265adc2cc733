"""Training steps per second on one device and on two forced host devices (data parallel), side by side.

Each case runs in a fresh process, because the number of host devices is fixed when JAX starts
(XLA_FLAGS=--xla_force_host_platform_device_count=N). The model is the book preset, the batch the book profile's
(rounded up to a multiple of the device count), the step chapter 7's, placed with chapter 8's mesh helpers.

    python benchmarks/bench_train.py [--steps 20] [--preset book]
"""
import argparse
import json
import os
import subprocess
import sys

CASE = r"""
import json, os, resource, sys, time
devices, steps, preset = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
import equinox as eqx, jax, numpy as np
from sepreformer_book.config import active_profile
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.fit import make_optimizer, step
from sepreformer_book.training import data_mesh, replicate, shard_batch

profile = active_profile(preset)
config = PRESETS[preset]
batch_size = -(-profile.batch_size // devices) * devices
samples = int(profile.segment_seconds * config.sample_rate)
rng = np.random.default_rng(0)
stems = (rng.standard_normal((batch_size, config.num_stems, samples)) * 0.1).astype(np.float32)
batch = {"mixture": stems.sum(axis=1), "stems": stems, "present": np.ones(stems.shape[:2], bool),
         "active": np.ones(stems.shape[:2], bool)}
mesh = data_mesh(jax.devices()[:devices])
optimizer = make_optimizer()
model = replicate(SepReformer(config, key=jax.random.key(0)), mesh)
state = replicate(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
start = time.perf_counter()
model, state, metrics = step(model, state, shard_batch(batch, mesh), optimizer)
jax.block_until_ready(metrics)
compile_s = time.perf_counter() - start
start = time.perf_counter()
for _ in range(steps):
    model, state, metrics = step(model, state, shard_batch(batch, mesh), optimizer)
jax.block_until_ready(metrics)
seconds = time.perf_counter() - start
print(json.dumps({"devices": jax.device_count(), "batch": batch_size, "steps_per_s": steps / seconds,
                  "audio_s_per_s": steps * batch_size * profile.segment_seconds / seconds, "first_step_s": compile_s,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_case(devices: int, steps: int, preset: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", CASE, str(devices), str(steps), preset], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"case with {devices} device(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="book")
    args = parser.parse_args()
    results = [run_case(n, args.steps, args.preset) for n in (1, 2)]
    base = results[0]
    print(f"training step, {args.preset} preset, {os.cpu_count()} CPU cores; {args.steps} timed steps after the first")
    print(f"{'devices':>7} {'batch':>5} {'steps/s':>8} {'audio s/s':>9} {'ratio':>6} {'first step s':>12} {'peak RSS GB':>11}")
    for r in results:
        print(f"{r['devices']:7d} {r['batch']:5d} {r['steps_per_s']:8.2f} {r['audio_s_per_s']:9.2f} "
              f"{r['audio_s_per_s'] / base['audio_s_per_s']:6.2f} {r['first_step_s']:12.1f} {r['peak_rss_gb']:11.2f}")
    print("ratio = audio seconds trained per second, relative to one device. Forced host devices share the same CPU "
          "cores, so on a CPU this measures the cost of the data-parallel code path, not a speed-up.")


if __name__ == "__main__":
    main()
