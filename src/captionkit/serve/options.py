"""The server's options: one frozen dataclass that the CLI, `run` and `create_app` all read."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from captionkit.errors import OptionError
from captionkit.flags import Flag, flag

API_KEY_ENV = "CAPTIONKIT_API_KEY"
LOOPBACK_NAMES = ("localhost",)
SERVER, BATCHING, LIMITS = "Server", "Batching", "Request limits"  # help panels


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class ServeOptions:
    """What the server loads, where it listens, and the limits that protect it."""

    model: str = flag("auto", "The captioning model: an alias, a Hub id or a local checkpoint folder.",
                      "--model", "-m", panel=SERVER)
    segment_model: str | None = flag(None, "A segmentation model for /v1/segment and the page's overlay.",
                                     "--segment", "--segment-model", panel=SERVER)
    clip_model: str | None = flag(None, "A CLIP model that scores every caption (CLIPScore).", panel=SERVER)
    host: str = flag("127.0.0.1", "The address to listen on; beyond this machine it needs --api-key.",
                     panel=SERVER)
    port: int = flag(8000, "The port to listen on; 0 picks a free one (the log says which).", panel=SERVER)
    api_key: str | None = field(default=None, repr=False, metadata={"flag": Flag(
        "The bearer token clients must send; default: $CAPTIONKIT_API_KEY.", panel=SERVER)})
    insecure: bool = flag(False, "Allow listening beyond this machine without an API key.", panel=SERVER)
    max_batch_size: int = flag(16, "The most images captioned in one batch, gathered across requests.",
                               panel=BATCHING)
    max_wait_ms: float = flag(10.0, "How long the oldest request waits for others to fill a batch (ms).",
                              panel=BATCHING)
    queue_size: int = flag(256, "Images that may wait for the model; past that, 503 with Retry-After.",
                           panel=BATCHING)
    request_timeout: float = flag(60.0, "Seconds a request may wait for its results (then 504).",
                                  panel=BATCHING)
    max_body_bytes: int = flag(32 * 1024 * 1024, "The largest request body in bytes (413 past it).",
                               panel=LIMITS)
    max_pixels: int = flag(50_000_000, "The largest image in pixels, checked before decoding.", panel=LIMITS)
    max_images: int = flag(16, "The most images one request may carry.", panel=LIMITS)
    max_tokens: int = flag(256, "The largest max_new_tokens a request may ask for.", panel=LIMITS)
    max_beams: int = flag(8, "The largest num_beams (and candidates) a request may ask for.", panel=LIMITS)
    cors_origins: tuple[str, ...] = flag((), "Web origins that may call the API from a browser (CORS).",
                                         panel=SERVER, cli_type=str, cli_default="",
                                         parse=_comma_list, metavar="LIST")

    def __post_init__(self) -> None:
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError(f"--api-key is empty: pass a key, or unset {API_KEY_ENV}")
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port {self.port}: use 0 to 65535 (0 picks a free port)")
        positive = {"--max-batch-size": self.max_batch_size, "--queue-size": self.queue_size,
                    "--request-timeout": self.request_timeout, "--max-body-bytes": self.max_body_bytes,
                    "--max-pixels": self.max_pixels, "--max-images": self.max_images,
                    "--max-tokens": self.max_tokens, "--max-beams": self.max_beams}
        for name, value in positive.items():
            if value <= 0:
                raise OptionError(f"{name} must be positive, not {value}")
        if self.max_wait_ms < 0:
            raise OptionError("--max-wait-ms cannot be negative")
        if "*" in self.cors_origins and self.api_key is not None:
            raise OptionError("--cors-origins '*' would let any web page use this server's API key "
                              "from a visitor's browser: list the origins that may")
        if self.api_key is None and not self.insecure and not is_loopback(self.host):
            raise OptionError(f"--host {self.host} listens beyond this machine: set --api-key (or "
                              f"{API_KEY_ENV}) so that only clients with the key are served, or "
                              "pass --insecure to serve anyone who can reach it")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1 or localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False
