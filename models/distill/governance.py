"""Where report text may be sent, and keeping the API key out of everything we write.

MIMIC-CXR is credentialed data: the PhysioNet Credentialed Health Data Use Agreement forbids sharing
it with third parties, which includes sending it to a hosted LLM API. PhysioNet's guidance of
24 Sept 2025 ("Use of MIMIC Data with Large Language Models and Online Services") requires zero data
retention by any third-party service, strongly recommends locally deployed LLMs, and asks users of a
cloud API to verify zero retention, no training on the data and no human review. So an endpoint that
is not on this machine or a private network is refused unless the config carries the explicit
acknowledgement below, which the user can only honestly write after checking those settings.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

EXTERNAL_ENDPOINT_ACK = "zero-retention verified"
PLACEHOLDER_KEY = "EMPTY"  # what local OpenAI-compatible servers (vLLM, llama.cpp) accept when none is set

POLICY_TEXT = (
    "MIMIC-CXR reports are credentialed data: the PhysioNet Credentialed Health Data Use Agreement forbids "
    "sharing them with third parties, including sending them through a hosted API. PhysioNet's guidance of "
    "24 Sept 2025 (https://physionet.org/news/post/llm-responsible-use) requires zero data retention by the "
    "service, no use for training and no human review, and strongly recommends a locally deployed LLM "
    "(e.g. `vllm serve` on your own GPU, see docs/distillation.md). If you have verified those settings for "
    f'this endpoint, set `seed_distill.external_endpoint_ack: "{EXTERNAL_ENDPOINT_ACK}"`.'
)


class EndpointPolicyError(ValueError):
    """The endpoint may not receive report text under the data-use policy."""


class MissingAPIKeyError(RuntimeError):
    """An endpoint that needs a key has none in the environment."""


def endpoint_host(url: str) -> str:
    host = urlsplit(url).hostname
    if not host:
        raise EndpointPolicyError(f"endpoint URL {url!r} has no host name")
    return host.lower()


def is_local_host(host: str) -> bool:
    """True for `localhost` and loopback/private/link-local IP literals. Every other name, `*.localhost`
    included, is external: a name cannot be checked without trusting DNS (or /etc/hosts)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


def check_endpoint(url: str, ack: str | None, what: str = "endpoint") -> bool:
    """Raise EndpointPolicyError unless `url` is local or acknowledged; returns True when local."""
    host = endpoint_host(url)
    if is_local_host(host):
        return True
    if ack == EXTERNAL_ENDPOINT_ACK:
        return False
    got = "no acknowledgement" if not ack else f"acknowledgement {ack!r} (expected {EXTERNAL_ENDPOINT_ACK!r})"
    raise EndpointPolicyError(
        f"refusing to send reports to external {what} host {host!r} with {got}. {POLICY_TEXT}"
    )


def check_route(url: str, proxy: str | None, ack: str | None) -> bool:
    """Judge every host report text passes through: the endpoint and, when the config sets one, its proxy.

    The environment's HTTP(S)_PROXY is never a route: the teacher's HTTP client ignores it (trust_env off),
    so a proxy the policy has not judged cannot receive the prompts. Returns True when the whole route is
    local.
    """
    local = check_endpoint(url, ack)
    if proxy is None:
        return local
    return check_endpoint(proxy, ack, what="proxy") and local


@dataclass(frozen=True)
class ApiKey:
    """The API key, read from the environment only; its repr and str never show the value."""

    env_var: str
    value: str = field(repr=False)

    def __str__(self) -> str:
        return f"ApiKey(env={self.env_var}, value=***)"

    __repr__ = __str__


def resolve_api_key(env_var: str, local: bool, send_to_local: bool = False) -> ApiKey:
    """The key to send: from `env_var` for an external endpoint (which fails early without one); a local
    endpoint gets a placeholder (vLLM without `--api-key` ignores it) unless the config says `send_to_local`,
    so an exported OPENAI_API_KEY never reaches a server on the network just because it is local."""
    value = os.environ.get(env_var, "")
    if local:
        return ApiKey(env_var, value if value and send_to_local else PLACEHOLDER_KEY)
    if value:
        return ApiKey(env_var, value)
    raise MissingAPIKeyError(
        f"environment variable {env_var} is not set; the teacher endpoint is external and needs an API key. "
        f"Export it (never put keys in config files): export {env_var}=..."
    )


def redact(text: str, secret: ApiKey | None) -> str:
    """Remove the key from any text that may be logged or stored (error messages echo request headers)."""
    if secret is None or secret.value in ("", PLACEHOLDER_KEY):
        return text
    return text.replace(secret.value, "***")
