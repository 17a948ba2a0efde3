"""Where the model runs. A backend takes a preprocessed batch [N, 3, H, W] and returns the model's
output [N, D]; everything before (decoding, preprocessing) and after (batching, normalising) is the
service's and the same for every backend."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable

import numpy as np

from embedder_svc.model_card import MODEL_FILE_NAME, ModelCard
from embedder_svc.settings import EmbedderSettings


class BackendError(Exception):
    """The backend cannot load the model, or failed to run a batch (callers see INTERNAL)."""


class BackendUnavailable(BackendError):
    """The model server cannot be reached, or its model is not ready yet; worth retrying
    (callers see UNAVAILABLE)."""


class BackendMisconfigured(BackendError):
    """The model server answers but lacks the model, or serves one that does not match the card;
    retrying will not help until someone fixes it (callers see FAILED_PRECONDITION)."""


class InferenceBackend(abc.ABC):
    #: What `Info.backend` reports.
    name: str
    #: Seconds between readiness checks while serving (`check_ready`); None: the backend cannot
    #: stop being ready once loaded (in-process), so nothing is checked.
    health_interval_s: float | None = None

    @abc.abstractmethod
    async def load(self) -> None:
        """Makes the model ready to run; raises `BackendError` if it cannot."""

    @abc.abstractmethod
    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """One batch at a time (the batcher never overlaps calls); raises `BackendError`."""

    def blocking_infer(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """A blocking `infer` that any thread may call, its runs and `infer`'s one at a time (a lone
        image then runs on the thread that decoded it: `MicroBatcher.run_now`), when the model runs
        in-process; None otherwise."""
        return None

    async def check_ready(self) -> None:
        """Raises `BackendUnavailable` or `BackendMisconfigured` when the loaded model can no longer
        serve (a remote server went away or dropped the model). Cheap; called every
        `health_interval_s` while serving."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Frees what `load` took; safe to call when `load` never ran or failed."""

    def describe(self) -> str:
        """One line for the startup log."""
        return self.name


def create_backend(settings: EmbedderSettings, model_dir: Path, card: ModelCard) -> InferenceBackend:
    if settings.backend == "onnxruntime":
        from embedder_svc.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            model_path=model_dir / MODEL_FILE_NAME,
            input_name=card.input.name,
            output_name=card.output.name,
            providers=settings.providers,
            inference_threads=settings.inference_threads,
        )
    if settings.backend == "triton":
        from embedder_svc.triton_backend import TritonBackend

        return TritonBackend(settings.triton, card)
    raise BackendError(f"unknown backend {settings.backend!r}")
