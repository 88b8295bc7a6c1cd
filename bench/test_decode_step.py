"""One decode step per engine, on a tiny model and on SmolLM2, and the cross-check against deepsparse.benchmark."""
import numpy as np
import pytest

from dlp_deploy.runtime.decode import step_inputs
from dlp_deploy.runtime.engines import ENGINES
from dlp_deploy.bench.harness import BenchSettings, deepsparse_benchmark_decode_ms, run_pair
from dlp_deploy.export.deployment import load_deployment
from dlp_deploy.provenance import machine_info

PROMPT = 32


def _decode_step(session):
    """Prefill once, then return a callable running one decode step at a fixed cache position."""
    ids = np.arange(1, PROMPT + 1, dtype=np.int64)[None] % 200 + 10
    session.prepare(PROMPT)
    session.prepare(1)
    past = session.init_past(PROMPT)
    _, present = session.run(ids, *step_inputs(session.window(0, PROMPT), 0, PROMPT), past)
    mask, positions, causal = step_inputs(session.window(PROMPT, 1), PROMPT, 1)
    token = np.asarray([[42]], np.int64)

    def step():
        return session.run(token, mask, positions, causal, session.advance(present, 1))

    return step


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
@pytest.mark.parametrize("engine", ["onnxruntime", "deepsparse", "deepsparse-external"])
def test_decode_step(benchmark, deployments, model, engine):
    dep = load_deployment(deployments[model])
    session = ENGINES[engine].compile(dep.onnx_path, dep.seq_len, machine_info()["usable_cores"])
    step = _decode_step(session)
    benchmark.group = f"decode step: {model}"
    benchmark.extra_info.update(engine=engine, seq_len=dep.seq_len, cache_filled=PROMPT)
    # the internal cache grows by one slot per step: stay well inside the window
    benchmark.pedantic(step, rounds=60 if engine == "deepsparse" else 100, warmup_rounds=3)


def test_harness_agrees_with_deepsparse_benchmark(deployments, record_property):
    """The harness's median decode step on DeepSparse (internal cache) vs DeepSparse's own benchmark_model on the
    same graph and shapes (1 input token, the deployment's window): within 10%."""
    cores = machine_info()["usable_cores"]
    ours = run_pair(str(deployments["smollm2"]),
                    BenchSettings("deepsparse", cores, prompt_len=64, gen_len=128, runs=3, warmup=1))
    theirs = deepsparse_benchmark_decode_ms(deployments["smollm2"], cores, internal_cache=True, seconds=15)
    ratio = ours["decode_ms"]["median"] / theirs
    record_property("harness_decode_ms", ours["decode_ms"]["median"])
    record_property("deepsparse_benchmark_ms", theirs)
    print(f"\nharness {ours['decode_ms']['median']:.2f} ms/token vs deepsparse.benchmark {theirs:.2f} ms "
          f"(ratio {ratio:.3f}); harness overhead {ours['harness_overhead']['fraction_of_decode']:.2%} of a step")
    assert ratio == pytest.approx(1.0, abs=0.10)
    assert ours["harness_overhead"]["fraction_of_decode"] < 0.02
