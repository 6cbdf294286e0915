"""Ray Serve LLM's PrefixCacheAffinityRouter, reading this service's requests: it looks
for a `prompt` or `messages` attribute holding text or OpenAI-style dicts, while our
handle payload (GenerationParams) holds ChatMessage records. This subclass hands it the
text it would have read from an OpenAI request (the messages' contents, joined), and
changes nothing else; bench/prefix_routing.py compares it with our router."""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from deployments.protocol import GenerationParams


class RayPrefixCacheAffinityRouter(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request) -> str:
        for arg in pending_request.args:
            if isinstance(arg, GenerationParams):
                if arg.messages:
                    return "".join(message.content for message in arg.messages)
                return arg.prompt
        raise ValueError("no GenerationParams in the request")
