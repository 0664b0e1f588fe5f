"""The one place that talks to MLflow.

- `Tracker`: experiments and runs (find by tags, create, reopen, end), params, artifacts.
- `RunLogger`: metrics, figures and artifacts from a training process, buffered and sent from a
  background thread, so a slow or dead tracking server never stalls training; what cannot be
  sent is retried and, at the end, counted and reported as lost.

Local default: a SQLite store `./mlflow.db` with artifacts under `./mlruns`; on a cluster, an
`mlflow server` URI from config (`tracking.uri`) or MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Optional

from avssl.errors import TrackingError

log = logging.getLogger("avssl.tracking")

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000
# MLflow 3 opens an experiment on the runs table (not the GenAI overview) when it is marked as
# model development.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _quiet_mlflow_http() -> None:
    """Fail fast instead of MLflow's minutes of built-in HTTP retries; we retry ourselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded encoder otherwise
    # One line from RunLogger says the server is down; not one urllib3 warning per attempt.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def resolve_uri(uri: Optional[str] = None, base: Optional[Path] = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else ./mlflow.db; SQLite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return f"sqlite:///{path.resolve()}"
    if "://" not in uri:  # a bare folder: a SQLite store inside it
        return f"sqlite:///{(Path(uri).resolve() / 'mlflow.db')}"
    return uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail before any compute is spent when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it (see cluster.yaml) "
                "or set tracking.uri / MLFLOW_TRACKING_URI to a reachable server"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"cannot write the MLflow store {uri}: folder {folder} is missing or read-only")


def _client(uri: str):
    _quiet_mlflow_http()
    from mlflow.tracking import MlflowClient

    # The registry named explicitly: MlflowClient otherwise takes the process-wide registry URI,
    # which an earlier run against another store may have set.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _process_uris(uri: str):
    """MLflow's process-wide tracking and registry URIs (and the environment variables MLflow
    sets with them for subprocesses) pointed at `uri` for the block, then put back as they were,
    unset included: log_model and models:/ downloads read only those, and a later client or Ray
    worker of this process must not inherit them."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking_state._tracking_uri, registry_state._registry_uri, {k: os.environ.get(k) for k in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_state._registry_uri = saved[1]
        for k, v in saved[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        s = "null" if v is None else str(v)
        out[k] = s if len(s) <= MAX_PARAM_LENGTH else s[: MAX_PARAM_LENGTH - 3] + "..."
    return out


class Tracker:
    def __init__(self, uri: Optional[str] = None, experiment: str = "avssl", artifact_root: Optional[str] = None, check: bool = True, timeout: float = 10.0):
        self.uri = resolve_uri(uri)
        if check:
            check_reachable(self.uri, timeout)
        self.client = _client(self.uri)
        self.experiment_name = experiment
        try:
            self.experiment_id = self._experiment(experiment, artifact_root)
        except Exception as e:
            raise TrackingError(f"MLflow at {self.uri} refused to open experiment '{experiment}': {e}") from None

    @classmethod
    def from_config(cls, tracking: Any, check: bool = True) -> "Tracker":
        """The tracker a config's `tracking` section describes (store, experiment, artifacts, timeout)."""
        return cls(tracking.uri, tracking.experiment, tracking.artifact_root, check=check, timeout=tracking.connect_timeout_s)

    def _mark_kind(self, exp: Any) -> str:
        """The experiment's id, after tagging it a model-training experiment if it is not yet
        (experiments made before the tag existed); cosmetic, so never fatal."""
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            try:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            except Exception as e:
                log.debug("could not tag experiment kind: %s", e)
        return exp.experiment_id

    def _experiment(self, name: str, artifact_root: Optional[str]) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return self._mark_kind(exp)
        location = None
        if artifact_root and "://" in artifact_root:  # an object store (s3://bucket/prefix): the experiment's folder under it
            location = f"{artifact_root.rstrip('/')}/{name}"
        elif self.uri.startswith("sqlite:///"):
            # Absolute artifact folder next to the store, so workers in another cwd agree.
            root = Path(artifact_root) if artifact_root else Path(self.uri[len("sqlite:///") :]).parent / "mlruns"
            location = (root.resolve() / name).as_uri()
        elif artifact_root:
            location = artifact_root
        try:
            return self.client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            exp = self.client.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return self._mark_kind(exp)

    # -- runs -------------------------------------------------------------------------------
    def find_runs(self, tags: dict[str, str], parent_id: Optional[str] = None, statuses: Optional[Iterable[str]] = None) -> list[Any]:
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if parent_id:
            clauses.append(f"tags.`{PARENT_TAG}` = '{parent_id}'")
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
        if statuses:
            runs = [r for r in runs if r.info.status in set(statuses)]
        return runs

    def find_run(self, tags: dict[str, str], parent_id: Optional[str] = None) -> Optional[Any]:
        runs = self.find_runs(tags, parent_id)
        return runs[0] if runs else None

    def start_run(self, name: str, tags: dict[str, str], params: Optional[dict[str, Any]] = None, parent_id: Optional[str] = None) -> str:
        all_tags = dict(tags)
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_or_start_run(self, name: str, tags: dict[str, str], params: Optional[dict[str, Any]] = None, parent_id: Optional[str] = None) -> tuple[str, bool]:
        """Reopen the run carrying these tags (under this parent), else create it. -> (id, reopened)."""
        run = self.find_run(tags, parent_id)
        if run is not None:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id, True
        return self.start_run(name, tags, params, parent_id), False

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flat_params(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        """Log a matplotlib figure and close it (a long study draws hundreds)."""
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(run_id, figure, path)
        finally:
            plt.close(figure)

    def log_artifact(self, run_id: str, local: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(local), artifact_path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def get_run(self, run_id: str) -> Any:
        try:
            return self.client.get_run(run_id)
        except Exception as e:
            raise TrackingError(f"no MLflow run '{run_id}' in {self.uri} ({type(e).__name__})") from None

    def download(self, run_id: str, artifact_path: str, dst: Optional[Path] = None) -> Path:
        from avssl import scratch

        dst = dst or scratch.folder("artifact-")
        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
        except Exception as e:
            raise TrackingError(f"run {run_id} has no artifact '{artifact_path}' ({type(e).__name__}: {e})") from None

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        return self.client.get_metric_history(run_id, key)

    # -- datasets and registered models ------------------------------------------------------
    def log_corpus(self, run_id: str, corpus: Any, context: str) -> None:
        """Record a corpus the run read as an MLflow dataset input (the UI's Dataset column):
        name, manifest digest, source folder, and clip/speaker counts per split."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        # Runs started side by side record the same corpus at the same moment; the store's unique
        # constraint then refuses one of them, and a retry links the record the other one wrote.
        # A browsing aid: whatever goes wrong here is a warning, never a failed run.
        for attempt in range(4):
            try:
                root = str(corpus.root)
                dataset = Dataset(name=corpus.name, digest=corpus.digest(), source_type="s3" if root.startswith("s3://") else "local",
                                  source=json.dumps({"uri": root}), profile=json.dumps(corpus.profile()))
                self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])
                return
            except Exception as e:
                if attempt == 3:
                    log.warning("corpus %s not recorded as a dataset of run %s: %s", corpus.root, run_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
                    return
                time.sleep(0.2 * (attempt + 1))

    def register_encoder(self, run_id: str, encoder_file: Path, name: str, aliases: Iterable[str] = ()) -> str:
        """Log the encoder as an MLflow PyTorch model of the run (signature and input example: one
        second of 16 kHz audio -> frame embeddings), with avssl's weights-only encoder file inside it,
        register it under `name`, and point `aliases` at the new version. Returns the version."""
        import re

        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        from avssl.models import load_encoder

        encoder, _ = load_encoder(encoder_file)
        encoder.eval()
        example = np.zeros((1, 16000), np.float32)
        with torch.no_grad():
            out = encoder(torch.from_numpy(example)).float().numpy()
        # The model file is the flavour's pickle (MLflow's graph format cannot export this encoder);
        # avssl itself only ever reads the weights-only encoder.pt stored beside it.
        flavour_log = logging.getLogger("mlflow.pytorch")
        level = flavour_log.level
        flavour_log.setLevel(logging.ERROR)
        try:
            with _process_uris(self.uri), mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(
                    encoder, name="encoder_model", signature=infer_signature(example, out), input_example=example,
                    extra_files=[str(encoder_file)], registered_model_name=name, pip_requirements=[f"torch=={torch.__version__}"],
                    serialization_format="pickle", await_registration_for=60,
                )
        finally:
            flavour_log.setLevel(level)
        version = str(info.registered_model_version)
        for alias in aliases:
            self.client.set_registered_model_alias(name, re.sub(r"[^\w-]", "-", alias)[:255], version)
        return version

    def registered_encoder(self, uri: str) -> tuple[Path, Any]:
        """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (the encoder weights file inside the
        registered model, its model version)."""
        from avssl.errors import ConfigError

        ref = uri[len("models:/"):]
        if "@" in ref:
            name, alias = ref.split("@", 1)
            get = lambda: self.client.get_model_version_by_alias(name, alias)  # noqa: E731
        elif "/" in ref and ref.rsplit("/", 1)[1].isdigit():
            name, version = ref.rsplit("/", 1)
            get = lambda: self.client.get_model_version(name, version)  # noqa: E731
        else:
            raise ConfigError(f"'{uri}': give models:/NAME@ALIAS or models:/NAME/VERSION")
        try:
            mv = get()
        except Exception:
            known = sorted(m.name for m in self.client.search_registered_models())
            raise ConfigError(f"'{uri}': no such registered model version in {self.uri}; registered models: {', '.join(known) or 'none'}") from None
        import mlflow.artifacts

        from avssl import scratch

        dst = scratch.folder("model-")
        with _process_uris(self.uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst)))
        found = sorted(local.rglob("encoder.pt"))
        if not found:
            raise TrackingError(f"'{uri}' (version {mv.version}) holds no encoder.pt; it was not registered by avssl")
        return found[0], mv


@contextlib.contextmanager
def system_metrics(loop_config: dict[str, Any], rank: int):
    """CPU, memory, disk, network (and GPU, with nvidia-ml-py installed and a GPU present)
    utilisation of the training process's machine, logged to its run as `system/*` while the block
    runs: rank 0 only, on when `tracking.system_metrics` is."""
    tracking = loop_config["cfg"].get("tracking", {})
    monitor = None
    if rank == 0 and loop_config.get("run_id") and tracking.get("system_metrics", True):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run

            monitor = SystemMetricsMonitor(loop_config["run_id"], sampling_interval=tracking.get("system_metrics_interval_s", 10.0),
                                           tracking_uri=loop_config["tracking_uri"])
            monitor.start()
        except Exception as e:  # monitoring is optional; training is not
            log.warning("system metrics off for this run: %s", e)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as e:
                log.warning("system metrics: %s", e)


class RunLogger:
    """Buffered, retrying, non-blocking logging into one run (used by the training processes)."""

    def __init__(self, uri: str, run_id: str, flush_every_s: float = 5.0, max_buffer: int = 100_000, fallback_dir: Optional[Path] = None,
                 connect_now: bool = True):
        self.uri, self.run_id = uri, run_id
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        self.fallback_dir = fallback_dir
        self._metrics: list[Any] = []
        self._uploads: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drained = threading.Event()
        self.sent = 0
        self.lost = 0
        self.failures = 0
        self.kept_locally: list[str] = []
        self._rendered: set[str] = set()
        self._warned = False
        self._client = None
        if connect_now:
            # Open the store now (SQLAlchemy engine, schema check: about a second of CPU) rather
            # than in the background thread in the middle of the first training steps.
            try:
                self.client.get_run(run_id)
            except Exception:
                pass  # down: metrics are buffered and retried
        self._thread = threading.Thread(target=self._run, name="avssl-mlflow", daemon=True)
        self._thread.start()

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._metrics.extend(Metric(k, float(v), now, int(step)) for k, v in values.items() if v is not None)
            overflow = len(self._metrics) - self.max_buffer
            if overflow > 0:
                del self._metrics[:overflow]
                self.lost += overflow

    def figure(self, figure: Any, path: str) -> None:
        """Render now (matplotlib is not thread-safe), upload later."""
        from avssl import scratch

        tmp = scratch.folder("fig-") / Path(path).name
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        self._rendered.add(str(tmp))
        self.artifact(tmp, str(Path(path).parent) if Path(path).parent != Path(".") else None)

    def _discard_rendered(self, local: str) -> None:
        """A figure file this logger rendered, once uploaded (or kept locally): removed."""
        if local in self._rendered:
            import shutil

            self._rendered.discard(local)
            shutil.rmtree(Path(local).parent, ignore_errors=True)

    def artifact(self, local: Path, artifact_path: Optional[str] = None) -> None:
        with self._lock:
            self._uploads.append((str(local), artifact_path))
        self._wake.set()

    def _send(self) -> None:
        with self._lock:
            metrics, self._metrics = self._metrics, []
            uploads, self._uploads = self._uploads, []
        done = 0
        try:
            while done < len(metrics):
                chunk = metrics[done : done + 500]
                self.client.log_batch(self.run_id, metrics=chunk)
                done += len(chunk)
                self.sent += len(chunk)
            while uploads:
                local, path = uploads[0]
                self.client.log_artifact(self.run_id, local, path)
                uploads.pop(0)
                self._discard_rendered(local)
            if self.failures:
                log.warning("MLflow at %s is reachable again; buffered metrics were sent", self.uri)
            self.failures = 0
            self._warned = False
        except Exception as e:
            self.failures += 1
            with self._lock:
                self._metrics[:0] = metrics[done:]
                self._uploads[:0] = uploads
            if not self._warned:
                log.warning(
                    "MLflow at %s unreachable (%s); training continues, %d metrics buffered for retry",
                    self.uri, type(e).__name__, len(self._metrics),
                )
                self._warned = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            if self._metrics or self._uploads:
                self._send()
            if not self.failures and not self._metrics and not self._uploads:
                self._drained.set()

    def flush(self) -> None:
        self._wake.set()

    def sync(self, timeout_s: float = 10.0) -> bool:
        """Send what is buffered now and wait for it, up to `timeout_s`, so that what a process
        logged before a checkpoint outlives the process. While the store is unreachable this
        returns at once (everything stays buffered for retry): training never waits on it.
        True when the buffer was sent."""
        if self.failures or not self._thread.is_alive():
            return False
        self._drained.clear()
        self._wake.set()
        return self._drained.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop the sender; try to send what is left until the deadline; report what was lost."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        deadline = time.time() + timeout_s
        while (self._metrics or self._uploads) and time.time() < deadline:
            self._send()
            if self._metrics or self._uploads:
                time.sleep(min(2.0, max(0.0, deadline - time.time())))
        with self._lock:
            self.lost += len(self._metrics)
            self._metrics = []
            for local, path in self._uploads:
                self.kept_locally.append(self._keep_locally(local, path))
                if self.fallback_dir is not None:
                    self._discard_rendered(local)
            self._uploads = []
        return {"sent": self.sent, "lost": self.lost, "kept_locally": self.kept_locally}

    def _keep_locally(self, local: str, path: Optional[str]) -> str:
        if self.fallback_dir is None:
            return local
        import shutil

        dst = self.fallback_dir / (path or "") / Path(local).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, dst)
        return str(dst)


def runs_page_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table. MLflow 3's UI opens every experiment on its GenAI overview
    unless the page says which workflow it is in; this link says model training."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def mlflow_ui_hint(uri: str, experiment_id: Optional[str] = None) -> str:
    if uri.startswith("sqlite:///"):
        hint = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        return hint + (f", then open {runs_page_url('http://127.0.0.1:5000', experiment_id)}" if experiment_id else "")
    return f"open {runs_page_url(uri, experiment_id) if experiment_id else uri} in a browser"
