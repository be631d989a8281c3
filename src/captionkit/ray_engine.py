"""The execute step on Ray: the same predictions as a local run, from model replicas on a cluster.

The driver plans and records as in a local run; `RayExecutor` sends the pending images through
Ray Data (`from_items` -> `map_batches` over a pool of `CaptionActor`s -> `iter_batches`). Each
actor loads the model once and runs the local engine's own `LocalExecutor` on its batches, so
decoding, failure isolation and out-of-memory halving are the library's, not copies. Rows stream
back to the driver, which turns them into `Outcome`s for the pipeline to record (one writer).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from captionkit import errors, gate, sources
from captionkit.errors import CaptionkitError, OptionError
from captionkit.execute import Decoding, LocalExecutor, Outcome, Predictor, WorkItem
from captionkit.models.base import DECLARED, Captioner
from captionkit.options import EngineOptions, GateOptions, GenerationOptions, LoadOptions, RunOptions
from captionkit.predictions import Prediction, regions_from_json, regions_to_json

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from captionkit.pipeline import Pipeline
    from captionkit.scoring import ClipScorer

CALLS_PER_REPLICA = 2
"""Batches a replica holds at once: one decodes in its threads while another is predicted on the
replica's one model thread, so an accelerator does not wait for the host between batches."""


@dataclass(frozen=True)
class ModelRecipe:
    """How a Ray worker loads the model: what `--model` names and the load options."""

    name: str
    load: LoadOptions = field(default_factory=LoadOptions)
    loader: Callable[[str, LoadOptions], Captioner] | None = None
    """A function importable on the workers that loads the model; none: `captionkit.models.load`."""

    def build(self) -> Captioner:
        if self.loader is not None:
            return self.loader(self.name, self.load)
        from captionkit.models import load

        return load(self.name, self.load)


def require(module: str = "ray") -> ModuleType:
    """`module` (Ray or one of its parts), or the OptionError of a run without the `[ray]` extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptionError("--engine ray needs Ray: pip install 'captionkit[ray]'") from None


def connect(engine: EngineOptions) -> bool:
    """Join `engine.ray_address`, or start Ray on this machine; True when this call started or
    joined it (False: this process was connected already, and that connection is used)."""
    ray = require()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"address": engine.ray_address, "logging_level": logging.WARNING}
    if engine.ray_address is None:
        options.update(num_cpus=engine.local_cpus, object_store_memory=engine.object_store_memory,
                       include_dashboard=False)
    try:
        ray.init(**options)
    except ConnectionError as err:
        raise OptionError(f"--ray-address {engine.ray_address}: cannot join the Ray cluster: "
                          f"{err}; start it with `ray start --head` or fix the address") from None
    return True


def _worker_resources(engine: EngineOptions) -> tuple[int, float, float]:
    """(replicas, GPUs each, CPUs each) for the cluster this process is connected to: as many
    replicas as its nodes hold, or --ray-workers (those that do not fit yet wait for nodes an
    autoscaler adds). When no node holds one, Ray would wait without end: that is an OptionError,
    unless --ray-workers says nodes are coming, which is then said once on stderr."""
    cluster = require().cluster_resources()
    gpus = engine.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    cpus = engine.cpus_per_worker or _default_cpus(gpus)
    fits = sum(_replicas_on(node, gpus, cpus) for node in _nodes())
    if fits < 1:
        shortage = (f"a replica needs {gpus:g} GPUs and {cpus:g} CPUs on one node and this Ray cluster "
                    f"has {cluster.get('GPU', 0):g} GPUs and {cluster.get('CPU', 0):g} CPUs")
        if engine.ray_workers is None:
            raise OptionError(f"{shortage}: lower --gpus-per-worker or --cpus-per-worker, or give "
                              "--ray-workers N to wait for nodes an autoscaler adds")
        from captionkit import ui

        ui.err.print(f"{shortage} yet: waiting for nodes an autoscaler adds (Ctrl-C stops)")
    return engine.ray_workers or fits, gpus, cpus


def _nodes() -> list[dict[str, float]]:
    """The resources of each live node of the cluster."""
    return [node["Resources"] for node in require().nodes() if node.get("Alive")]


def _replicas_on(node: dict[str, float], gpus: float, cpus: float) -> int:
    """How many replicas of `gpus` GPUs and `cpus` CPUs one node with `node`'s resources holds."""
    room = node.get("CPU", 0) / cpus
    if gpus:
        room = min(room, node.get("GPU", 0) / gpus)
    return math.floor(room + 1e-9)  # 0.3 / 0.1 is 2.9999999999999996 in floats


def _default_cpus(gpus: float) -> float:
    """CPUs per replica when not given: 8 per GPU (decoding and the processor feed it), at most
    what the leanest GPU node has per GPU; 4 for a CPU replica, at most the biggest node's."""
    nodes = _nodes()
    if gpus:
        per_gpu = min((node.get("CPU", 0) / node["GPU"] for node in nodes if node.get("GPU")), default=8)
        return float(max(1, min(8, math.floor(per_gpu * gpus))))
    return float(max(1, min(4, max((node.get("CPU", 0) for node in nodes), default=1))))


def ray_version() -> tuple[int, int]:
    import ray

    major, minor = (int(part) for part in re.findall(r"\d+", ray.__version__)[:2])
    return major, minor


def actor_pool_arguments(size: int) -> dict[str, Any]:
    """`map_batches` arguments for a fixed pool of `size` actors, as this Ray release spells them:
    `concurrency=size` from 2.9 (which deprecated `compute=`) until 2.51, which deprecated
    `concurrency` for `compute=ActorPoolStrategy(size=...)` again. Where the strategy can run
    several calls of one actor at once, each replica takes `CALLS_PER_REPLICA` batches."""
    if (2, 9) <= ray_version() < (2, 51):
        return {"concurrency": size}
    from ray.data import ActorPoolStrategy

    overlap: dict[str, Any] = {}
    parameters = inspect.signature(ActorPoolStrategy).parameters
    if CALLS_PER_REPLICA > 1 and "enable_true_multi_threading" in parameters:
        # without it Ray Data runs one call of an actor at a time, whatever the concurrency
        overlap = {"max_concurrent_calls_per_actor": CALLS_PER_REPLICA,
                   "enable_true_multi_threading": True}
    return {"compute": ActorPoolStrategy(size=size, **overlap)}


def restart_arguments(task_retries: int) -> dict[str, Any]:
    """Actor arguments that restart a replica whose process died and retry its batches.

    They go through `map_batches`' `**ray_remote_args`, which Ray 2.60 deprecated (for removal
    in 2.64) with no named replacement; from 2.64 Ray Data's own default applies (restart and
    retry without limit).
    """
    if ray_version() >= (2, 64):
        return {}
    return {"max_restarts": -1, "max_task_retries": task_retries}


def _from_items(rows: list[dict], blocks: int):
    """`ray.data.from_items` cut into `blocks` blocks (`parallelism` before Ray 2.10)."""
    import ray.data

    keyword = ("override_num_blocks" if "override_num_blocks" in
               inspect.signature(ray.data.from_items).parameters else "parallelism")
    return ray.data.from_items(rows, **{keyword: blocks})


@dataclass(frozen=True)
class WorkerPlan:
    """What every actor needs to predict as the driver's pipeline would."""

    model: ModelRecipe
    generation: GenerationOptions
    gate: GateOptions
    batch_size: int
    decoding: Decoding
    key: str
    """The driver's resume key: a worker whose model would record under another one refuses."""


def _result_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("hash", pa.string()), ("error", pa.string()),
                      ("predicted", pa.bool_()), ("model_failed", pa.bool_()),
                      ("seconds", pa.float64()), ("text", pa.string()), ("extras", pa.string()),
                      ("regions", pa.string()), ("refusal", pa.string()), ("refusal_type", pa.string())])


class ModelThread(Predictor):
    """A predictor that concurrent calls share: every batch is predicted on one thread of its own,
    in turn. The model then has one OpenMP team, and CUDA graphs replay on the thread that
    recorded them, while each call's images decode in that call's threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="captionkit-model")

    def predict(self, images: Sequence[Image.Image],
                prompts: Sequence[str | None]) -> list[Prediction | str]:
        return self.thread.submit(super().predict, images, prompts).result()


class CaptionActor:
    """One model replica: loads the model once, then predicts Ray Data batches of work rows
    (index, path, name, prompt) into result rows with the local engine's executor. Calls may run
    at once (`CALLS_PER_REPLICA`): they share the executor, so an image predicted by one is known
    to the others, and the model thread, so one batch is predicted at a time."""

    def __init__(self, plan: WorkerPlan) -> None:
        # A captionkit error (no such model, another resume key) goes back as the rows' answer
        # for the driver to raise: Ray keeps only the text of an exception raised here, and
        # wraps one raised by a batch in its own types.
        self.refusal: CaptionkitError | None = None
        try:
            self.executor = self._executor(plan)
        except CaptionkitError as err:
            self.refusal = err

    @staticmethod
    def _executor(plan: WorkerPlan) -> LocalExecutor:
        from captionkit.keys import resume_key
        from captionkit.pipeline import run_identity

        _quiet_transformers()
        captioner = plan.model.build()
        scorer = gate.load_scorer(plan.gate, plan.generation, str(captioner.device))
        key = resume_key(run_identity(captioner, plan.generation, scorer, plan.decoding.full_decode,
                                      plan.decoding.gpu_jpeg))
        if key != plan.key:
            raise OptionError(
                f"{plan.model.name} loads on this Ray worker as {captioner.identity()} on "
                f"{captioner.device}, which the driver did not plan with: describe the model with "
                "ray_engine.describe (the workers' own load), or pass --dtype and --device explicitly")
        decoding = plan.decoding
        # the threads of the CPUs this replica holds, not the node's, for each of its calls: when
        # the model is the limit only one call decodes at a time (benchmarks/RESULTS.md)
        if decoding.workers is None:
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            decoding = replace(decoding, workers=min(8, math.ceil(cpus) + 2))
        predictor = ModelThread(captioner, plan.generation, scorer, plan.batch_size)
        return LocalExecutor(predictor, decoding, {}, {})

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        rows = batch.to_pylist()
        if self.refusal is not None:
            refusal = {"refusal": str(self.refusal), "refusal_type": type(self.refusal).__name__}
            return pa.Table.from_pylist([{"index": row["index"], **refusal} for row in rows],
                                        schema=_result_schema())
        items = [WorkItem(sources.ImageRef(Path(os.fsdecode(row["path"])), row["name"]),
                          prompt=row["prompt"]) for row in rows]
        outcomes = [outcome for done in self.executor.execute(items) for outcome in done]
        return pa.Table.from_pylist([_result_row(row["index"], outcome) for row, outcome
                                     in zip(rows, outcomes, strict=True)], schema=_result_schema())


def _result_row(index: int, outcome: Outcome) -> dict:
    prediction = outcome.prediction
    return {"index": index, "hash": outcome.item.hash, "error": outcome.item.error,
            "predicted": prediction is not None, "model_failed": outcome.model_failed,
            "seconds": outcome.seconds,
            "text": prediction.text if prediction is not None else None,
            "extras": json.dumps(prediction.extras) if prediction is not None else None,
            "regions": (json.dumps(regions_to_json(prediction.regions))
                        if prediction is not None and prediction.regions else None)}


def _outcome(item: WorkItem, row: dict) -> Outcome:
    """The driver's outcome for its own work item, from the row a worker sent back; raises the
    captionkit error of a worker that refused to work."""
    if row["refusal"] is not None:
        kind = getattr(errors, row["refusal_type"], CaptionkitError)
        usable = (isinstance(kind, type) and issubclass(kind, CaptionkitError)
                  and kind is not errors.ImageError)
        raise (kind if usable else CaptionkitError)(row["refusal"])
    item.hash, item.error = row["hash"], row["error"]
    prediction = None
    if row["predicted"]:
        prediction = Prediction(row["text"], json.loads(row["extras"]),
                                regions_from_json(json.loads(row["regions"] or "null")))
    return Outcome(item, prediction, row["seconds"], row["model_failed"])


class RayExecutor:
    """Predicts work items on Ray actors; batches come back in the order they finish.

    Identical files are predicted once per actor (each keeps what it predicted); across actors
    and earlier runs they are predicted again, to the same caption, so nothing is shipped to
    every actor. An actor whose process dies is restarted and its batches retried.
    """

    def __init__(self, plan: WorkerPlan, engine: EngineOptions) -> None:
        self.plan = plan
        self.engine = engine

    def execute(self, items: list[WorkItem]) -> Iterator[list[Outcome]]:
        if not items:
            return
        connect(self.engine)
        context = require("ray.data").DataContext.get_current()
        shown = context.enable_progress_bars
        context.enable_progress_bars = False  # the pipeline's own bar counts images
        try:
            dataset = self._dataset(items)
            # without prefetch: by default the iterator hands a batch over only once the next one
            # is done too, so each would be recorded (and shown) a batch late
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                              prefetch_batches=0):
                yield [_outcome(items[row["index"]], row) for row in table.to_pylist()]
        except Exception as err:
            _raise_user_error(err)
            raise
        finally:
            context.enable_progress_bars = shown

    def _dataset(self, items: list[WorkItem]):
        size, gpus, cpus = _worker_resources(self.engine)
        rows = [{"index": index, "path": os.fsencode(item.ref.path), "name": item.ref.name,
                 "prompt": item.prompt} for index, item in enumerate(items)]
        # one block per model batch: results come back (and are recorded) batch by batch, and a
        # dead actor costs the retry of its own batches only
        blocks = max(1, math.ceil(len(rows) / self.plan.batch_size))
        with warnings.catch_warnings():  # see restart_arguments
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            return _from_items(rows, blocks).map_batches(
                CaptionActor, fn_constructor_args=(self.plan,), batch_size=self.plan.batch_size,
                batch_format="pyarrow", num_gpus=gpus, num_cpus=cpus,
                **restart_arguments(self.engine.task_retries), **actor_pool_arguments(min(size, blocks)))


def _raise_user_error(err: BaseException) -> None:
    """Raise the captionkit error a worker raised (an option that cannot work there, a model that
    does not exist), unwrapped from Ray's task and actor errors so that it reads as one line, as
    in a local run; return when there is none."""
    seen: set[int] = set()
    found: BaseException | None = err
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        cause = getattr(found, "cause", None)  # Ray's task error keeps the worker's exception here
        if isinstance(cause, BaseException):
            found = cause
        elif isinstance(found, CaptionkitError):
            raise found from None
        else:
            found = found.__cause__ or found.__context__


def worker_plan(pipeline: Pipeline, model: ModelRecipe) -> WorkerPlan:
    """The pipeline's model, options and resume key, for its workers."""
    options = pipeline.options
    return WorkerPlan(model, pipeline.generation, options.gate, pipeline.batch_size,
                      Decoding.of(options), pipeline.key)


def executor_for(pipeline: Pipeline, engine: EngineOptions,
                 model: ModelRecipe) -> RayExecutor | None:
    """The executor `engine` asks for, for `pipeline.run(inputs, executor=...)`; None for the local
    engine, whose executor the pipeline makes itself (it reuses what its store knows)."""
    if engine.engine == "local":
        return None
    return RayExecutor(worker_plan(pipeline, model), engine)


def pipeline_for(model: ModelRecipe, generation: GenerationOptions, options: RunOptions,
                 engine: EngineOptions,
                 scorer: ClipScorer | None = None) -> tuple[Pipeline, RayExecutor | None]:
    """The pipeline and executor a command runs with: under the local engine the model loaded
    here; under Ray the model as a worker describes it, its batches predicted on Ray actors.
    Run it with `pipeline.run(inputs, executor=executor)`."""
    from captionkit.pipeline import Pipeline

    if engine.engine == "local":
        return Pipeline(model.build(), generation, options, scorer), None
    if scorer is None:  # the driver needs only the scorer's name and scale, for the resume key
        scorer = gate.load_scorer(options.gate, generation, "cpu")
    pipeline = Pipeline(describe(model, engine), generation, options, scorer)
    return pipeline, executor_for(pipeline, engine, model)


class RemoteCaptioner(Captioner):
    """A model that runs on Ray workers, as the driver's pipeline sees it: the declared attributes
    and identity a worker reported after loading it. The driver loads no weights."""

    def __init__(self, described: dict) -> None:
        import torch

        for name in _DESCRIBED:
            setattr(self, name, described[name])
        self.device = torch.device(described["device"])
        self._identity = described["identity"]
        self._takes_jpeg_bytes = described["takes_jpeg_bytes"]

    def identity(self) -> dict:
        return dict(self._identity)

    def takes_jpeg_bytes(self) -> bool:
        return self._takes_jpeg_bytes

    def caption(self, images, options, prompts=None):
        raise CaptionkitError(f"{self.model_id} runs on Ray workers: caption through a Pipeline "
                              "with ray_engine.executor_for(...)")


_DESCRIBED = sorted(DECLARED - {"device", "preprocess"})
"""What a worker reports of the model it loaded (the device goes as its name; its preprocessing
runs where it loaded, and is reported only as whether it takes JPEG bytes)."""


def _quiet_transformers() -> None:
    """No download bars or load reports in the workers' logs, which Ray copies to the driver."""
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _describe(model: ModelRecipe) -> dict:
    _quiet_transformers()
    captioner = model.build()
    described = {name: getattr(captioner, name) for name in _DESCRIBED}
    return {**described, "device": str(captioner.device), "identity": captioner.identity(),
            "takes_jpeg_bytes": captioner.takes_jpeg_bytes()}


def describe(model: ModelRecipe, engine: EngineOptions) -> RemoteCaptioner:
    """Load the model once on a worker with a replica's resources and describe it, so the driver
    plans (resume key, batch size) with what the workers will run: `--dtype auto` is bfloat16 on
    a GPU worker and float32 on a CPU-only driver."""
    ray = require()
    connect(engine)
    _, gpus, cpus = _worker_resources(engine)
    task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=engine.task_retries)(_describe)
    try:
        return RemoteCaptioner(ray.get(task.remote(model)))
    except Exception as err:
        _raise_user_error(err)
        raise
