"""vLLM plugin entry point (``vllm.general_plugins``)."""


def register() -> None:
    """Register bebop with vLLM. Runs in every vLLM process: idempotent and cheap."""
