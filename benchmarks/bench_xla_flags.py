"""Does any XLA CPU flag, or bfloat16 matrix products, make the book's training step faster on this machine? Each case
runs in its own worker process (XLA reads its flags once, when the backend starts); the workers compile the same step
on the same weights and batch, report the first loss (a flag must not change it beyond float32 rounding), then take
turns: every round, each worker times a few steps while the others wait, so that all of them see the same machine
state. "bf16 dense layers" keeps the flags at their defaults and instead runs every dense layer of the dual-path
blocks (q, k, v, output and feed-forward projections) as a bfloat16 product with float32 accumulation: this CPU's
AMX units multiply bfloat16 several times faster than float32 at large sizes.

    python benchmarks/bench_xla_flags.py [--rounds 8] [--steps 5] [--flags NAME,...] [--save]

--save writes benchmarks/results/xla_flags.json. A flag set that fails to start (a flag this jaxlib does not know) is
reported as such, not timed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "xla_flags.json"

# name -> XLA_FLAGS added to the environment's
FLAG_SETS = {
    "default": "",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "no XNNPACK": "--xla_cpu_use_xnnpack=false",
    "XNNPACK": "--xla_cpu_use_xnnpack=true",
    "no fusion emitters": "--xla_cpu_use_fusion_emitters=false",
    "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
    "concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "one Eigen thread": "--xla_cpu_multi_thread_eigen=false",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "bf16 dense layers": "",
}
BF16_CASES = ("bf16 dense layers",)

WORKER = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
import equinox as eqx, jax, jax.numpy as jnp, numpy as np
from sepreformer_book.fit import OptimizerConfig, make_optimizer, step
from sepreformer_book.model import PRESETS, SepReformer

if sys.argv[1] == "bf16":  # the dual-path blocks look both functions up at call time
    import sepreformer_book.dual_path as dual_path
    rowwise = dual_path.apply_rowwise

    def product(x, w):
        return jnp.matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    def apply_rowwise(layer, x):  # a Sequential recurses through the module's name, so reaches this one
        if isinstance(layer, eqx.nn.Linear):
            y = product(x, layer.weight.T)
            return y if layer.bias is None else y + layer.bias
        return rowwise(layer, x)

    def project_qkv(attn, x):
        projections = (attn.query_proj, attn.key_proj, attn.value_proj)
        assert all(p.bias is None for p in projections)
        qkv = product(x, jnp.concatenate([p.weight for p in projections]).T)
        width = attn.num_heads * attn.qk_size
        return jnp.split(qkv, [width, 2 * width], axis=-1)

    dual_path.apply_rowwise, dual_path.project_qkv = apply_rowwise, project_qkv

config, batch_size, seconds = PRESETS["book"], 2, 1.0
samples, stems = int(seconds * config.sample_rate), config.num_stems
rng = np.random.default_rng(0)
parts = (0.1 * rng.standard_normal((batch_size, stems, samples))).astype(np.float32)
batch = {"mixture": parts.sum(1), "stems": parts, "active": np.ones((batch_size, stems), bool),
         "present": np.ones((batch_size, stems), bool)}
batch = jax.device_put(batch)
optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=10_000))
model = SepReformer(config, key=jax.random.key(0))
state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
tick = time.perf_counter()
model, state, metrics = step(model, state, batch, optimizer)
loss = float(metrics["loss"])
print(json.dumps({"ready": True, "loss": loss, "first_call_s": time.perf_counter() - tick}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        tick = time.perf_counter()
        model, state, metrics = step(model, state, batch, optimizer)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    print(json.dumps({"times": times}), flush=True)
"""


def start(name: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG_SETS[name]).strip())
    precision = "bf16" if name in BF16_CASES else "float32"
    return subprocess.Popen([sys.executable, "-c", WORKER, precision], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps each worker times per round")
    parser.add_argument("--flags", default=",".join(FLAG_SETS), help="names of FLAG_SETS to run")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/xla_flags.json")
    args = parser.parse_args()
    names = args.flags.split(",")
    unknown = [n for n in names if n not in FLAG_SETS]
    if unknown or "default" not in names:
        parser.error(f"--flags: unknown {unknown}, or 'default' missing; choose from {', '.join(FLAG_SETS)}")

    workers, ready, failed = {}, {}, {}
    for name in names:  # one at a time, so that compiling does not overlap
        worker = start(name)
        line = worker.stdout.readline()
        if not line:
            failed[name] = worker.stderr.read().strip().splitlines()[-1:] or ["no output"]
            worker.stdin.close()
            worker.wait()
            continue
        workers[name], ready[name] = worker, json.loads(line)
    times = {name: [] for name in workers}
    for _ in range(args.rounds):
        for name, worker in workers.items():
            worker.stdin.write(f"{args.steps}\n")
            worker.stdin.flush()
            times[name] += json.loads(worker.stdout.readline())["times"]
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()

    base_loss, base_time = ready["default"]["loss"], statistics.median(times["default"])
    rows = []
    for name in workers:
        median = statistics.median(times[name])
        rows.append(dict(name=name, flags=FLAG_SETS[name], median_s=median, min_s=min(times[name]),
                         max_s=max(times[name]), first_call_s=ready[name]["first_call_s"],
                         loss_gap=abs(ready[name]["loss"] - base_loss) / abs(base_loss), speedup=base_time / median))
    print(f"book training step, batch 2 x 1 s, {args.rounds} rounds x {args.steps} steps, {os.cpu_count()} cores")
    print("| flag set | XLA_FLAGS | median ms | range ms | first call s | loss gap | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | `{r['flags']}` | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f}–"
              f"{1e3 * r['max_s']:.1f} | {r['first_call_s']:.1f} | {r['loss_gap']:.1e} | {r['speedup']:.2f} |")
    for name, why in failed.items():
        print(f"| {name} | `{FLAG_SETS[name]}` | did not start: {' '.join(why)[:80]} |")
    if args.save:
        sys.path.insert(0, str(Path(__file__).parents[1]))
        from sepreformer_book.config import atomic_write

        import jax

        payload = dict(finished=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), jax=jax.__version__,
                       cpu_count=os.cpu_count(), rounds=args.rounds, steps=args.steps, rows=rows,
                       failed={name: " ".join(why) for name, why in failed.items()})
        atomic_write(RESULTS, lambda f: f.write(json.dumps(payload, indent=1).encode()))


if __name__ == "__main__":
    main()
