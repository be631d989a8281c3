"""The Ray engine's options, its Ray-release spellings and its sizing, without starting Ray."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

from captionkit import ray_engine
from captionkit.errors import OptionError
from captionkit.options import GenerationOptions, RunOptions
from captionkit.ray_engine import EngineOptions

NO_RAY = "--engine ray needs Ray: pip install 'captionkit[ray]'"


@pytest.fixture
def ray():
    return pytest.importorskip("ray")


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OptionError, match=f"^{re.escape(NO_RAY)}$"):
        ray_engine.pipeline_for(ray_engine.ModelRecipe("objects"), GenerationOptions(),
                                RunOptions(output_dir=tmp_path), EngineOptions(engine="ray"))
    with pytest.raises(OptionError, match="needs Ray"):
        ray_engine.connect(EngineOptions(engine="ray"))


CLI_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None
from captionkit.cli import main
sys.argv = ["captionkit", *sys.argv[1:]]
main()
"""


def test_the_command_without_ray_ends_in_one_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    done = subprocess.run([sys.executable, "-c", CLI_WITHOUT_RAY, "caption", str(tmp_path / "a.png"),
                           "--model", "objects", "--engine", "ray", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {NO_RAY}"
    assert "Traceback" not in done.stderr


def test_the_local_engine_refuses_ray_only_options():
    assert EngineOptions().engine == "local"
    with pytest.raises(OptionError, match="--ray-address applies to --engine ray"):
        EngineOptions(ray_address="auto")
    with pytest.raises(OptionError, match="--engine 'spark'"):
        EngineOptions(engine="spark")


@pytest.mark.parametrize(("options", "message"), [
    ({"ray_workers": 0}, "--ray-workers must be at least 1"),
    ({"gpus_per_worker": -1}, "--gpus-per-worker cannot be negative"),
    ({"cpus_per_worker": 0}, "--cpus-per-worker must be positive"),
    ({"task_retries": -1}, "--task-retries cannot be negative"),
    ({"object_store_memory": 1000}, "--object-store-memory must be at least"),
    ({"ray_address": "auto", "local_cpus": 4}, "a cluster joined with --ray-address is sized where"),
])
def test_bad_ray_options_are_named(options, message):
    with pytest.raises(OptionError, match=message):
        EngineOptions(engine="ray", **options)


@pytest.mark.parametrize(("version", "keyword"), [
    ("2.9.3", "concurrency"), ("2.50.1", "concurrency"), ("2.51.0", "compute"), ("2.60.0", "compute"),
    ("3.0.0.dev0", "compute")])
def test_the_actor_pool_is_spelt_as_each_release_wants(monkeypatch, ray, version, keyword):
    monkeypatch.setattr(ray, "__version__", version)
    arguments = ray_engine.actor_pool_arguments(3)
    assert list(arguments) == [keyword]
    if keyword == "compute":
        from ray.data import ActorPoolStrategy

        assert isinstance(arguments["compute"], ActorPoolStrategy)
        assert arguments["compute"].min_size == arguments["compute"].max_size == 3
        assert arguments["compute"].max_concurrent_calls_per_actor == ray_engine.CALLS_PER_REPLICA
        assert arguments["compute"].enable_true_multi_threading
    else:
        assert arguments["concurrency"] == 3


def test_a_release_whose_pool_runs_one_call_at_a_time_gets_a_plain_pool(monkeypatch, ray):
    """Before Ray Data could run an actor's calls at once, a replica takes its batches in turn."""
    import ray.data

    def older_strategy(*, size: int, max_tasks_in_flight_per_actor: int | None = None):
        return ("pool", size)

    monkeypatch.setattr(ray, "__version__", "2.55.0")
    monkeypatch.setattr(ray.data, "ActorPoolStrategy", older_strategy)
    assert ray_engine.actor_pool_arguments(2) == {"compute": ("pool", 2)}


def test_restarts_are_explicit_until_ray_drops_the_argument(monkeypatch, ray):
    monkeypatch.setattr(ray, "__version__", "2.60.0")
    assert ray_engine.restart_arguments(5) == {"max_restarts": -1, "max_task_retries": 5}
    monkeypatch.setattr(ray, "__version__", "2.64.0")
    assert ray_engine.restart_arguments(5) == {}


@pytest.mark.parametrize(("engine", "device"), [("local", "cuda"), ("ray", "cpu")])
def test_the_driver_loads_the_gate_scorer_on_its_cpu_under_ray(monkeypatch, tmp_path, engine, device):
    from typer.testing import CliRunner

    from captionkit import gate
    from captionkit.cli import app

    asked = []

    def load_scorer(options, generation, device="auto"):
        asked.append(device)
        raise OptionError("scorer asked for")

    monkeypatch.setattr(gate, "load_scorer", load_scorer)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["caption", str(tmp_path / "a.png"), "--model", "objects",
                                      "--engine", engine, "--device", "cuda", "--min-score", "0.3",
                                      "-o", str(tmp_path / "out")])
    assert str(result.exception) == "scorer asked for", result.output
    assert asked == [device]


def on_cluster(monkeypatch, ray, *nodes: dict[str, float]) -> None:
    """Ray's view of a cluster of these live nodes (and one dead one), without starting Ray."""
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0) + amount
    dead = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [dead, *({"Alive": True, "Resources": n} for n in nodes)])
    monkeypatch.setattr(ray, "cluster_resources", lambda: totals)


@pytest.mark.parametrize(("nodes", "options", "sized"), [
    ([{"CPU": 2.0}], {}, (1, 0.0, 2.0)),
    ([{"CPU": 16.0}, {"CPU": 6.0}], {}, (5, 0.0, 4.0)),
    ([{"CPU": 32.0, "GPU": 4.0}, {"CPU": 10.0, "GPU": 1.0}], {}, (5, 1.0, 8.0)),
    ([{"CPU": 12.0, "GPU": 2.0}, {"CPU": 4.0}], {}, (2, 1.0, 6.0)),
    ([{"CPU": 16.0, "GPU": 1.0}], {"gpus_per_worker": 0.5}, (2, 0.5, 8.0)),
    ([{"CPU": 16.0, "GPU": 1.0}], {"gpus_per_worker": 0.0}, (4, 0.0, 4.0)),
    ([{"CPU": 0.3}], {"cpus_per_worker": 0.1}, (3, 0.0, 0.1)),
    ([{"CPU": 2.0}], {"ray_workers": 3}, (3, 0.0, 2.0)),
])
def test_replicas_are_sized_to_the_live_nodes(monkeypatch, ray, nodes, options, sized):
    on_cluster(monkeypatch, ray, *nodes)
    assert ray_engine._worker_resources(EngineOptions(engine="ray", **options)) == sized


@pytest.mark.parametrize("options", [{"gpus_per_worker": 1}, {"cpus_per_worker": 3}])
def test_a_replica_that_no_node_holds_is_refused(monkeypatch, ray, options):
    on_cluster(monkeypatch, ray, {"CPU": 2.0}, {"CPU": 2.0})
    with pytest.raises(OptionError, match=r"and this Ray cluster has 0 GPUs and 4 CPUs: lower "
                                          "--gpus-per-worker or --cpus-per-worker, or give --ray-workers"):
        ray_engine._worker_resources(EngineOptions(engine="ray", **options))


@pytest.mark.parametrize(("options", "sized"), [
    ({"gpus_per_worker": 1, "ray_workers": 2}, (2, 1.0, 8.0)),
    ({"cpus_per_worker": 3, "ray_workers": 1}, (1, 0.0, 3.0))])
def test_ray_workers_wait_for_nodes_an_autoscaler_adds(monkeypatch, ray, capsys, options, sized):
    """An autoscaling cluster (KubeRay with no GPU node yet) holds no replica when the run starts."""
    on_cluster(monkeypatch, ray, {"CPU": 2.0}, {"CPU": 2.0})
    assert ray_engine._worker_resources(EngineOptions(engine="ray", **options)) == sized
    assert "yet: waiting for nodes an autoscaler adds" in capsys.readouterr().err


def test_a_gpu_replica_needs_its_cpus_on_its_gpu_node(monkeypatch, ray):
    on_cluster(monkeypatch, ray, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 32.0})
    with pytest.raises(OptionError, match="a replica needs 1 GPUs and 8 CPUs on one node"):
        ray_engine._worker_resources(EngineOptions(engine="ray", cpus_per_worker=8))


def test_connect_starts_a_local_ray_sized_by_the_options(monkeypatch, ray):
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(ray, "init", lambda **options: started.append(options))
    engine = EngineOptions(engine="ray", local_cpus=2, object_store_memory=100_000_000)
    assert ray_engine.connect(engine) is True
    assert ray_engine.connect(engine) is False
    [options] = started
    assert options["address"] is None and options["num_cpus"] == 2
    assert options["object_store_memory"] == 100_000_000


def test_an_unreachable_cluster_is_named_with_what_to_do(monkeypatch, ray):
    def refuse(**options):
        raise ConnectionError(f"could not find any running Ray instance at {options['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(OptionError, match=r"^--ray-address 10\.0\.0\.9:6379: cannot join the Ray cluster: "
                                          r"could not find any running Ray instance at 10\.0\.0\.9:6379; "
                                          r"start it with `ray start --head` or fix the address$"):
        ray_engine.connect(EngineOptions(engine="ray", ray_address="10.0.0.9:6379"))
