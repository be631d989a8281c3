"""The server's options: one frozen dataclass that the CLI, `run` and `create_app` all read."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from captionkit.errors import OptionError

API_KEY_ENV = "CAPTIONKIT_API_KEY"
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeOptions:
    """What the server loads, where it listens, and the limits that protect it."""

    model: str = "auto"
    """The captioning model: an alias (blip-large), a Hub id or a local checkpoint folder."""
    segment_model: str | None = None
    """A segmentation model for /v1/segment and the page's overlay; none by default."""
    clip_model: str | None = None
    """A CLIP model that scores every caption (CLIPScore); with --candidates the best one is kept."""
    host: str = "127.0.0.1"
    """The address to listen on. Anything beyond this machine needs --api-key (or --insecure)."""
    port: int = 8000
    """The port to listen on; 0 picks a free one (the log says which)."""
    api_key: str | None = field(default=None, repr=False)
    """The bearer token clients must send (Authorization: Bearer KEY); default: $CAPTIONKIT_API_KEY."""
    insecure: bool = False
    """Allow listening beyond this machine without an API key."""
    max_batch_size: int = 16
    """The most images the model worker captions in one batch, gathered from concurrent requests."""
    max_wait_ms: float = 10.0
    """How long the oldest waiting request may wait for others to fill a batch, in milliseconds."""
    queue_size: int = 256
    """Images that may wait for the model; past that, requests get 503 with Retry-After."""
    request_timeout: float = 60.0
    """Seconds a request may wait for its results before it gets 504 and leaves the queue."""
    max_body_bytes: int = 32 * 1024 * 1024
    """The largest request body in bytes, counted while it is read (413 past it)."""
    max_pixels: int = 50_000_000
    """The largest image in pixels, checked before it is decoded (the decompression-bomb guard)."""
    max_images: int = 16
    """The most images one request may carry."""
    max_tokens: int = 256
    """The largest max_new_tokens a request may ask for."""
    max_beams: int = 8
    """The largest num_beams (and number of candidates) a request may ask for."""
    cors_origins: tuple[str, ...] = ()
    """Web origins allowed to call the API from a browser (CORS); none by default."""

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
        for flag, value in positive.items():
            if value <= 0:
                raise OptionError(f"{flag} must be positive, not {value}")
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
