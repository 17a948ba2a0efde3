"""In-process onnxruntime. Batches run on the backend's own single thread, so inference never blocks
the event loop; a lone image may run on the decode thread that prepared it (`blocking_infer`). A lock
keeps runs one at a time either way, so inference never competes with itself; onnxruntime
parallelises inside one run."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from embedder_svc.backends import BackendError, InferenceBackend

logger = logging.getLogger(__name__)

# Used, in this order, when no providers are configured and this onnxruntime build offers them.
_ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_CPU_PROVIDER = "CPUExecutionProvider"


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    if requested:
        missing = [provider for provider in requested if provider not in available]
        if missing:
            raise BackendError(
                f"onnxruntime providers not available in this build: {', '.join(missing)} "
                f"(available: {', '.join(available)})"
            )
        return list(requested)
    return [provider for provider in _ACCELERATED_PROVIDERS if provider in available] + [_CPU_PROVIDER]


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        input_name: str,
        output_name: str,
        providers: Sequence[str] = (),
        inference_threads: int = 0,
    ) -> None:
        self.model_path = model_path
        self.input_name = input_name
        self.output_name = output_name
        self.requested_providers = list(providers)
        self.inference_threads = inference_threads
        self._executor: ThreadPoolExecutor | None = None
        self._session: ort.InferenceSession | None = None
        self._one_run_at_a_time = threading.Lock()

    async def load(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-onnxruntime")
        loop = asyncio.get_running_loop()
        self._session = await loop.run_in_executor(self._executor, self._create_session)

    def _create_session(self) -> ort.InferenceSession:
        providers = resolve_providers(self.requested_providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.inference_threads
        # Idle intra-op threads would otherwise spin for the next run, taking the cores that image
        # decoding needs (measured: ingest +10%, embedder CPU per search about 2.5x lower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {error}") from error
        inputs = [node.name for node in session.get_inputs()]
        outputs = [node.name for node in session.get_outputs()]
        if self.input_name not in inputs or self.output_name not in outputs:
            raise BackendError(
                f"{self.model_path} has inputs {inputs} and outputs {outputs}; the model card names "
                f"input {self.input_name!r} and output {self.output_name!r}"
            )
        logger.info("onnxruntime session for %s on %s", self.model_path, session.get_providers())
        return session

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None or self._executor is None:
            raise BackendError("model not loaded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, self._session, batch)

    def blocking_infer(self) -> Callable[[np.ndarray], np.ndarray]:
        return self._run_loaded

    def _run_loaded(self, batch: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise BackendError("model not loaded")
        return self._run(session, batch)

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        try:
            with self._one_run_at_a_time:
                (output,) = session.run([self.output_name], {self.input_name: batch})
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise BackendError(f"onnxruntime failed on a batch of {len(batch)}: {error}") from error
        return np.asarray(output, dtype=np.float32)

    async def close(self) -> None:
        self._session = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            # Lets a running batch finish; the batcher has stopped submitting new ones.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    def describe(self) -> str:
        providers = self._session.get_providers() if self._session is not None else self.requested_providers
        return f"{self.name} ({', '.join(providers) or 'default providers'})"
