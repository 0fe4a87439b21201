"""Per-choice speculative metrics in OpenAI responses (n > 1 and multi-prompt too).

vLLM 0.32 puts one sequence's record in ``metrics.speculative_decoding`` and only when a
response has a single choice (n == 1, one prompt); with our record class that payload
already includes bebop's entropy / per-position fields (``SpeculativeDecodingMetrics``
allows extra keys). These patches add ``speculative_decoding`` to *every choice*, taken from
that choice's own sequence, so n > 1 responses carry each sequence's metrics:

* non-streaming: on each ``choices[i]`` of the response;
* streaming: on the chunk that carries the choice's ``finish_reason``.

The wrappers only read the ``RequestOutput``s flowing through the generator and add a key;
they never change what vLLM computes. Effect on engines that are not bebop: none unless the
engine runs vLLM's own ``per_request_spec_decode_metrics``; then its choices gain the same
per-choice key (a sequence without a record gets nothing).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

from bebop_vllm.plugin.patches.base import Patch

CHOICE_KEY = "speculative_decoding"
_SSE_PREFIX = "data: "


def _metrics_of(output: Any) -> dict[str, Any] | None:
    record = getattr(output, "spec_decode_metrics", None)
    return None if record is None else record.to_dict()


def _set_choice(choice: Any, metrics: dict[str, Any] | None) -> None:
    if metrics is not None:
        setattr(choice, CHOICE_KEY, metrics)  # OpenAIBaseModel allows extra fields


def _inject_sse(chunk: str, by_index: dict[int, dict[str, Any]]) -> str:
    """Add metrics to the finishing choices of one ``data: {...}`` SSE chunk."""
    if not by_index or not chunk.startswith(_SSE_PREFIX) or '"finish_reason":"' not in chunk:
        return chunk
    try:
        payload = json.loads(chunk[len(_SSE_PREFIX):])
    except ValueError:
        return chunk
    changed = False
    for choice in payload.get("choices") or []:
        metrics = by_index.get(choice.get("index"))
        if choice.get("finish_reason") is not None and metrics is not None:
            choice[CHOICE_KEY] = metrics
            changed = True
    return f"{_SSE_PREFIX}{json.dumps(payload, separators=(',', ':'))}\n\n" if changed else chunk


class _Recorder:
    """Wraps a result generator; remembers each finished sequence's metrics by choice index."""

    def __init__(self, source: AsyncIterator[Any], num_choices: int, tagged: bool) -> None:
        self.source, self.num_choices, self.tagged = source, num_choices, tagged
        self.by_index: dict[int, dict[str, Any]] = {}
        self.last: Any = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for item in self.source:
            prompt_idx, res = item if self.tagged else (0, item)
            self.last = res
            for output in getattr(res, "outputs", None) or []:
                metrics = _metrics_of(output)
                if metrics is not None:
                    self.by_index[prompt_idx * self.num_choices + output.index] = metrics
            yield item


def _bind(original: Any, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = inspect.signature(original).bind(*args, **kwargs)
    return bound


def _wrap_stream(original: Any, tagged: bool) -> Any:
    @functools.wraps(original)
    async def stream(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(original, args, kwargs)
        request = bound.arguments["request"]
        recorder = _Recorder(bound.arguments["result_generator"], request.n or 1, tagged)
        bound.arguments["result_generator"] = recorder.__aiter__()
        async for chunk in original(*bound.args, **bound.kwargs):
            yield _inject_sse(chunk, recorder.by_index) if isinstance(chunk, str) else chunk

    return stream


def _wrap_completion_response(original: Any) -> Any:
    @functools.wraps(original)
    def request_output_to_completion_response(self: Any, final_res_batch: list[Any], *args: Any,
                                              **kwargs: Any) -> Any:
        response = original(self, final_res_batch, *args, **kwargs)
        # vLLM appends one choice per output, prompt after prompt (serving.py:521-585).
        outputs = [o for res in final_res_batch for o in res.outputs]
        if len(outputs) == len(response.choices):
            for choice, output in zip(response.choices, outputs, strict=True):
                _set_choice(choice, _metrics_of(output))
        return response

    return request_output_to_completion_response


def _wrap_chat_full(original: Any) -> Any:
    @functools.wraps(original)
    async def chat_completion_full_generator(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(original, args, kwargs)
        recorder = _Recorder(bound.arguments["result_generator"], 1, tagged=False)
        bound.arguments["result_generator"] = recorder.__aiter__()
        response = await original(*bound.args, **bound.kwargs)
        if recorder.last is not None and hasattr(response, "choices"):
            by_index = {o.index: _metrics_of(o) for o in recorder.last.outputs}
            for choice in response.choices:
                _set_choice(choice, by_index.get(choice.index))
        return response

    return chat_completion_full_generator


_COMPLETION = "vllm.entrypoints.openai.completion.serving"
_CHAT = "vllm.entrypoints.openai.chat_completion.serving"

COMPLETION_RESPONSE = Patch(
    name="metrics_openai_completion_response",
    upstream="vllm/entrypoints/openai/completion/serving.py:505 "
    "OpenAIServingCompletion.request_output_to_completion_response (vLLM 0.32.0)",
    module=_COMPLETION, owner="OpenAIServingCompletion",
    attr="request_output_to_completion_response",
    expected_params=("self", "final_res_batch", "request", "request_id", "created_time",
                     "model_name", "tokenizer", "request_metadata"),
    make_replacement=_wrap_completion_response,
)
COMPLETION_STREAM = Patch(
    name="metrics_openai_completion_stream",
    upstream="vllm/entrypoints/openai/completion/serving.py:279 "
    "OpenAIServingCompletion.completion_stream_generator (vLLM 0.32.0)",
    module=_COMPLETION, owner="OpenAIServingCompletion", attr="completion_stream_generator",
    expected_params=("self", "request", "engine_inputs", "result_generator", "request_id",
                     "created_time", "model_name", "num_prompts", "tokenizer", "request_metadata"),
    make_replacement=lambda original: _wrap_stream(original, tagged=True),
)
CHAT_FULL = Patch(
    name="metrics_openai_chat_full",
    upstream="vllm/entrypoints/openai/chat_completion/serving.py:935 "
    "OpenAIServingChat.chat_completion_full_generator (vLLM 0.32.0)",
    module=_CHAT, owner="OpenAIServingChat", attr="chat_completion_full_generator",
    expected_params=("self", "request", "result_generator", "request_id", "model_name",
                     "conversation", "tokenizer", "request_metadata", "parser", "mm_token_counts"),
    make_replacement=_wrap_chat_full,
)
CHAT_STREAM = Patch(
    name="metrics_openai_chat_stream",
    upstream="vllm/entrypoints/openai/chat_completion/serving.py:466 "
    "OpenAIServingChat.chat_completion_stream_generator (vLLM 0.32.0)",
    module=_CHAT, owner="OpenAIServingChat", attr="chat_completion_stream_generator",
    expected_params=("self", "request", "result_generator", "request_id", "model_name",
                     "conversation", "tokenizer", "request_metadata", "chat_template_kwargs",
                     "mm_token_counts"),
    make_replacement=lambda original: _wrap_stream(original, tagged=False),
)

OPENAI_PATCHES: list[Patch] = [COMPLETION_RESPONSE, COMPLETION_STREAM, CHAT_FULL, CHAT_STREAM]
