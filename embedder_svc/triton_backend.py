"""The model on a Triton Inference Server, over gRPC (``tritonclient.grpc.aio``).

The embedder still decodes and preprocesses as its model card says, and still micro-batches; each
micro-batch becomes one Triton ``ModelInfer`` call. Errors keep their meaning for callers: Triton
unreachable, too slow or still loading the model -> `BackendUnavailable` (UNAVAILABLE, at once: no
call waits for a dead server); Triton up without the model, or with a model that is not the card's
-> `BackendMisconfigured` (FAILED_PRECONDITION, naming the model)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from embedder_svc.backends import BackendError, BackendMisconfigured, BackendUnavailable, InferenceBackend
from embedder_svc.model_card import CARD_VERSION_PARAMETER, ModelCard
from embedder_svc.settings import TritonSettings

logger = logging.getLogger(__name__)

_TRITON_DTYPES = {"float32": "FP32", "float16": "FP16"}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
# Transient: the server is down, restarting, overloaded or slow.
_UNAVAILABLE_CODES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                      "StatusCode.RESOURCE_EXHAUSTED"}
# Bigger inputs are serialised off the event loop.
_OFFLOAD_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_arguments() -> list[tuple[str, int]]:
    """gRPC channel options for the Triton connection. The reconnect backoff is short, so the
    embedder notices a restarted Triton within about a second (gRPC's default backs off to two
    minutes)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


class TritonBackend(InferenceBackend):
    name = "triton"

    def __init__(self, settings: TritonSettings, card: ModelCard) -> None:
        self.settings = settings
        self.card = card
        self.url = settings.url
        self.model_name = settings.model_name or card.name
        self.model_version = settings.model_version
        self.health_interval_s = settings.health_interval_s
        self._datatype = _TRITON_DTYPES[card.input.dtype]
        self._numpy_dtype = _NUMPY_DTYPES[card.input.dtype]
        self._client: triton_aio.InferenceServerClient | None = None
        # Triton's max_batch_size for the model; bigger micro-batches are split.
        self.max_batch_size = 0
        self.served_versions: list[str] = []
        self._revalidate = False
        self._refusal: BackendMisconfigured | None = None

    # ---- errors ---------------------------------------------------------------------------------

    @property
    def _model_label(self) -> str:
        return f"model {self.model_name!r}" + (f" version {self.model_version}" if self.model_version else "")

    def _translate(self, error: InferenceServerException, what: str) -> BackendError:
        status = error.status() or ""
        message = error.message() or status or "no details"
        if status in _UNAVAILABLE_CODES:
            return BackendUnavailable(f"triton at {self.url} unavailable ({what}): {message}")
        if status == "StatusCode.NOT_FOUND":
            return BackendMisconfigured(f"triton at {self.url} has no {self._model_label}: {message}")
        return BackendError(f"triton at {self.url} failed ({what}, {status or 'error'}): {message}")

    # ---- readiness ------------------------------------------------------------------------------

    def _connected_client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.url, channel_args=channel_arguments())
        return self._client

    async def check_ready(self) -> None:
        """Raises unless Triton says the model is ready (says why when it is not). After a failed
        check the model is checked against the card again once it is back: a restarted Triton may
        serve something else under the same name."""
        try:
            await self._check_model_ready()
        except BackendError:
            self._revalidate = True
            raise
        if self._revalidate:
            try:
                await self._read_model()
            except BackendMisconfigured as error:
                self._refusal = error  # no inference on a model that is not the card's
                raise
            self._revalidate, self._refusal = False, None

    async def _check_model_ready(self) -> None:
        client = self._connected_client()
        timeout = self.settings.check_timeout_s
        try:
            if await client.is_model_ready(self.model_name, self.model_version, client_timeout=timeout):
                return
            index = await client.get_model_repository_index(client_timeout=timeout)
        except InferenceServerException as error:
            raise self._translate(error, "readiness check") from None
        entries = [entry for entry in index.models if entry.name == self.model_name]
        if not entries:
            known = ", ".join(sorted({entry.name for entry in index.models})) or "none"
            raise BackendMisconfigured(
                f"triton at {self.url} has no model {self.model_name!r} in its repository (models there: {known})"
            )
        if self.model_version:
            versioned = [entry for entry in entries if entry.version == self.model_version]
            if not versioned:
                known = ", ".join(sorted(entry.version for entry in entries if entry.version)) or "none"
                raise BackendMisconfigured(
                    f"triton at {self.url} has no version {self.model_version} of model {self.model_name!r} "
                    f"(versions there: {known})"
                )
            entries = versioned
        states = "; ".join(
            f"version {entry.version or '?'} {entry.state or 'UNKNOWN'}" + (f" ({entry.reason})" if entry.reason else "")
            for entry in entries
        )
        if any(entry.state == "LOADING" for entry in entries):
            raise BackendUnavailable(f"triton at {self.url} is still loading {self._model_label}: {states}")
        raise BackendMisconfigured(f"triton at {self.url} has {self._model_label} but it is not ready: {states}")

    async def load(self) -> None:
        await self._check_model_ready()
        await self._read_model()

    async def _read_model(self) -> None:
        client = self._connected_client()
        timeout = self.settings.check_timeout_s
        try:
            metadata = await client.get_model_metadata(self.model_name, self.model_version, client_timeout=timeout)
            config = (await client.get_model_config(self.model_name, self.model_version, client_timeout=timeout)).config
        except InferenceServerException as error:
            raise self._translate(error, "reading the model's metadata") from None
        self._check_signature(metadata, config)
        self.max_batch_size = int(config.max_batch_size)
        self.served_versions = list(metadata.versions)

    def _check_signature(self, metadata: object, config: object) -> None:
        """The model Triton serves must be the one the card describes: same tensors, same version."""
        card = self.card
        inputs = {tensor.name: tensor for tensor in metadata.inputs}  # type: ignore[attr-defined]
        outputs = {tensor.name: tensor for tensor in metadata.outputs}  # type: ignore[attr-defined]
        problems = []
        if config.max_batch_size < 1:  # type: ignore[attr-defined]
            problems.append("it does not batch (max_batch_size 0); the embedder sends [N, 3, H, W] batches")
        wanted_input = [-1, 3, card.input.height, card.input.width]
        tensor = inputs.get(card.input.name)
        if tensor is None:
            problems.append(f"no input {card.input.name!r} (inputs: {', '.join(inputs) or 'none'})")
        elif tensor.datatype != self._datatype or list(tensor.shape) != wanted_input:
            problems.append(
                f"input {card.input.name!r} is {tensor.datatype} {list(tensor.shape)}, the card needs "
                f"{self._datatype} {wanted_input}"
            )
        tensor = outputs.get(card.output.name)
        if tensor is None:
            problems.append(f"no output {card.output.name!r} (outputs: {', '.join(outputs) or 'none'})")
        elif list(tensor.shape)[-1:] != [card.output.dimension]:
            problems.append(f"output {card.output.name!r} has shape {list(tensor.shape)}, the card says {card.output.dimension} values")
        parameters = config.parameters  # type: ignore[attr-defined]
        served_version = parameters[CARD_VERSION_PARAMETER].string_value if CARD_VERSION_PARAMETER in parameters else None
        if served_version is not None and served_version != card.version:
            problems.append(
                f"it was written from card version {served_version}, the embedder's card ({card.name}) is version "
                f"{card.version}: the vectors would not match the preprocessing"
            )
        if problems:
            raise BackendMisconfigured(f"triton at {self.url}: {self._model_label} does not match the model card: "
                                       + "; ".join(problems))
        if served_version is None:
            logger.warning("triton model %s carries no %s parameter; its card version cannot be checked",
                           self.model_name, CARD_VERSION_PARAMETER)

    # ---- inference ------------------------------------------------------------------------------

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._client is None or self.max_batch_size < 1:
            raise BackendError("model not loaded")
        if self._refusal is not None:
            raise self._refusal
        if len(batch) <= self.max_batch_size:
            return await self._infer_one(batch)
        parts = [await self._infer_one(batch[start:start + self.max_batch_size])
                 for start in range(0, len(batch), self.max_batch_size)]
        return np.concatenate(parts)

    def _request_input(self, batch: np.ndarray) -> InferInput:
        tensor = InferInput(self.card.input.name, list(batch.shape), self._datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=self._numpy_dtype))
        return tensor

    async def _infer_one(self, batch: np.ndarray) -> np.ndarray:
        assert self._client is not None
        if batch.nbytes > _OFFLOAD_BYTES:
            tensor = await asyncio.to_thread(self._request_input, batch)
        else:
            tensor = self._request_input(batch)
        try:
            result = await self._client.infer(
                self.model_name, [tensor], model_version=self.model_version,
                outputs=[InferRequestedOutput(self.card.output.name)],
                client_timeout=self.settings.request_timeout_s,
            )
        except InferenceServerException as error:
            raise self._translate(error, f"inference on a batch of {len(batch)}") from None
        output = result.as_numpy(self.card.output.name)
        if output is None or output.shape != (len(batch), self.card.output.dimension):
            shape = None if output is None else list(output.shape)
            raise BackendError(
                f"triton returned {shape} for a batch of {len(batch)}; expected [{len(batch)}, {self.card.output.dimension}]"
            )
        return np.asarray(output, dtype=np.float32)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def describe(self) -> str:
        versions = ",".join(self.served_versions) or self.model_version or "latest"
        return f"{self.name} ({self.url}, model {self.model_name} version {versions}, max batch {self.max_batch_size})"
