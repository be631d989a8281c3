"""Remote endpoints: OpenAI-compatible chat servers (`openai:`) and the Hugging Face Inference API
(`hf-api:`), with requests in parallel, retries with backoff, and errors mapped to run outcomes."""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from PIL import Image

from captionkit.errors import CaptionkitError, ModelNotFoundError, OptionError
from captionkit.models.base import Caption, Captioner
from captionkit.options import GenerationOptions, LoadOptions

DEFAULT_PROMPT = "Write a one-sentence caption for this image."
# what chat models are asked for each --detail level when no --prompt is given
INSTRUCTIONS = {
    "brief": DEFAULT_PROMPT,
    "detailed": "Describe this image in detail.",
    "more-detailed": "Describe this image in as much detail as you can, in one paragraph.",
}
OPENAI_API_BASE = "https://api.openai.com/v1"
INPUT_SIZE = 768
MAX_SIDE = 2048
JPEG_QUALITY = 90
BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 120.0
FAILING_STREAK = 16
WAKE_SECONDS = 0.2
"""Images in a row that got no caption after every retry before a run stops: the server is down."""


class AccessError(CaptionkitError):
    """The endpoint refuses this account (bad or missing credentials, no access, no quota)."""


class EndpointUnreachableError(CaptionkitError):
    """The endpoint could not be connected to, even after retries."""


class EndpointFailingError(CaptionkitError):
    """The endpoint answers, but with server errors for image after image, even after retries."""


class PartialFailure(Exception):
    """Some images of a batch got no caption; `outcomes` holds a Caption or a reason per image."""

    def __init__(self, outcomes: list[Caption | str]) -> None:
        reasons = [o for o in outcomes if isinstance(o, str)]
        super().__init__(f"{len(reasons)} of {len(outcomes)} images failed, first: {reasons[0]}")
        self.outcomes = outcomes


class _Transient(Exception):
    """A failure worth retrying: 429, 5xx, a timeout or a dropped connection."""

    def __init__(self, reason: str, retry_after: float | None = None,
                 unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.unreachable = unreachable


class _Rejected(Exception):
    """The server will never caption this image as sent (400, 422, an unusable answer)."""


class RemoteCaptioner(Captioner):
    """What every endpoint shares: `concurrency` requests in flight, retries, and error mapping.

    Subclasses send one image in `_request`, raising `_Transient`, `_Rejected` or what `_http_error` gives.
    """

    input_size: int | None = INPUT_SIZE
    credential: str = ""
    """The environment variable the key comes from, named in messages that say what to set."""
    login_hint: str = ""

    def __init__(self, model_id: str, endpoint: str, secret: str | None, options: LoadOptions) -> None:
        self.endpoint = endpoint
        self._secret = secret
        self.model_id = model_id
        self.concurrency = options.concurrency
        # one batch is one round of parallel requests; the store commits after each
        self.preferred_batch_size = options.concurrency
        self.timeout = options.timeout
        self.max_retries = options.max_retries
        self._streak = 0  # images in a row whose retries all failed
        self._streak_lock = threading.Lock()

    def caption(
        self,
        images: list[Image.Image],
        options: GenerationOptions,
        prompts: list[str | None] | None = None,
    ) -> list[Caption]:
        """One Caption per image; raises PartialFailure when the server did not caption some of them."""
        prompts = list(prompts) if prompts is not None else [options.prompt] * len(images)
        stop = threading.Event()
        pool = ThreadPoolExecutor(min(self.concurrency, max(1, len(images))),
                                  thread_name_prefix="captionkit-remote")
        futures = [pool.submit(self._caption_one, image, options, prompt, stop)
                   for image, prompt in zip(images, prompts, strict=True)]
        try:
            outcomes = _results(futures)
        except BaseException:
            # an abort (bad key, unreachable server, Ctrl-C) stops the other requests' retries
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        captions = [o for o in outcomes if isinstance(o, Caption)]
        if len(captions) < len(outcomes):
            raise PartialFailure(outcomes)
        return captions

    def _caption_one(self, image: Image.Image, options: GenerationOptions, prompt: str | None,
                     stop: threading.Event) -> Caption | str:
        """A caption, or the reason there is none; raises CaptionkitError when the run must stop."""
        jpeg = _jpeg(image)
        for attempt in range(self.max_retries + 1):
            try:
                caption = _caption(self._request(jpeg, options, prompt))
                with self._streak_lock:
                    self._streak = 0
                return caption
            except _Rejected as err:
                return self._redact(str(err))
            except _Transient as err:
                failure = err
                if err.retry_after is not None and err.retry_after > MAX_RETRY_AFTER_SECONDS:
                    return self._redact(f"{err.reason}; the server asks to wait {err.retry_after:.0f} s, "
                                        "try again later with --retry-failed")
            if attempt < self.max_retries:
                delay = failure.retry_after if failure.retry_after is not None else _backoff(attempt)
                if stop.wait(delay):
                    return "cancelled"
        attempts = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        if failure.unreachable:
            raise EndpointUnreachableError(self._redact(
                f"{self.model_id}: cannot reach {self.endpoint} ({failure.reason}; {attempts}). Images "
                "captioned so far are saved: run the same command again to resume"))
        with self._streak_lock:
            self._streak += 1
            streak = self._streak
        if streak >= FAILING_STREAK:
            raise EndpointFailingError(self._redact(
                f"{self.model_id}: {streak} images in a row got no caption from {self.endpoint} "
                f"(last: {failure.reason}; {attempts} each). Images captioned so far are saved: "
                "run the same command again to resume once the server recovers"))
        return self._redact(f"{failure.reason} ({attempts}; --retry-failed tries again)")

    def _request(self, jpeg: bytes, options: GenerationOptions, prompt: str | None) -> list[str]:
        """The caption, or `options.candidates` of them, for one JPEG image."""
        raise NotImplementedError

    def _http_error(self, status: int, message: str, retry_after: float | None = None,
                    code: object = None) -> Exception:
        """The exception an HTTP error status stands for: abort the run, retry, or fail the image."""
        message = self._redact(" ".join(message.split())[:300]).rstrip(".") or "no details"
        where = f"{self.model_id}: HTTP {status} from {self.endpoint}: {message}"
        if code == "insufficient_quota":
            return AccessError(f"{where}. The account is out of quota")
        if status == 401 and self._secret:
            return AccessError(f"{where}. The key was refused; set {self.credential} to a valid one"
                               f"{self.login_hint}")
        if status == 401:
            return AccessError(f"{where}. No key was sent; set {self.credential}{self.login_hint}")
        if status == 403:
            return AccessError(f"{where}. The key has no access to this model; check {self.credential}"
                               f"{self.login_hint}")
        if status == 404:
            return ModelNotFoundError(f"{where}. Check the model name and --api-base")
        if status in (408, 429) or status >= 500:
            return _Transient(f"HTTP {status}: {message}", retry_after)
        return _Rejected(f"HTTP {status}: {message}")

    def _redact(self, text: str) -> str:
        # servers may echo the key they were sent ("Incorrect API key provided: ...")
        return text.replace(self._secret, "***") if self._secret else text


def _results(futures: list[Future]) -> list:
    """The futures' results in order; the first exception raised as soon as it comes. Wakes every
    WAKE_SECONDS: the kernel may hand Ctrl-C to a request thread, and a main thread asleep on a lock
    would not see it before that request ended."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=WAKE_SECONDS, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # raises the request's abort, if any
    return [future.result() for future in futures]


def _openai_base_url() -> str | None:
    """`OPENAI_BASE_URL`, which the OpenAI SDK and tools built on it read too."""
    value = os.environ.get("OPENAI_BASE_URL", "").strip()
    if value and not value.startswith(("http://", "https://")):
        raise OptionError(f"OPENAI_BASE_URL={value!r}: an API base starts with http:// or https://")
    return value or None


class OpenAICaptioner(RemoteCaptioner):
    """`openai:<model>`: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp)."""

    credential = "OPENAI_API_KEY"

    def __init__(self, model: str, options: LoadOptions) -> None:
        if not model:
            raise OptionError("openai: needs a model name, e.g. --model openai:gpt-4o-mini")
        api_base = (options.api_base or _openai_base_url() or OPENAI_API_BASE).rstrip("/")
        self.model = model
        self.url = f"{api_base}/chat/completions"
        where = _display_url(api_base)
        super().__init__(f"openai:{model}@{where.split('://', 1)[1]}", where,
                         os.environ.get("OPENAI_API_KEY") or None, options)

    def _request(self, jpeg: bytes, options: GenerationOptions, prompt: str | None) -> list[str]:
        body = {"model": self.model, "messages": _messages(jpeg, prompt, options), **_sampling(options)}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Accept": "application/json"})
        if self._secret:
            # unredirected: a redirect to another host must not carry the key along
            request.add_unredirected_header("Authorization", f"Bearer {self._secret}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            message, code = _error_details(_read_quietly(err))
            raise self._http_error(err.code, message, _retry_after(err.headers.get("Retry-After")),
                                   code) from None
        except urllib.error.URLError as err:
            raise _Transient(f"connection failed: {err.reason}", unreachable=True) from None
        except TimeoutError:
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Transient(f"connection dropped: {type(err).__name__}: {err}") from None
        try:
            contents = [choice["message"]["content"] for choice in json.loads(payload)["choices"]]
        except (ValueError, KeyError, TypeError):
            raise _Rejected(f"not a chat completion: {payload[:200]!r}") from None
        return [_text(content) for content in contents]


class HFInferenceCaptioner(RemoteCaptioner):
    """`hf-api:<model-id>` runs image-to-text; `hf-api:chat:<model-id>` sends the image to a chat VLM."""

    credential = "HF_TOKEN"
    login_hint = " or run `hf auth login`"

    def __init__(self, name: str, options: LoadOptions) -> None:
        from huggingface_hub import InferenceClient, get_token

        self.task, model = ("chat", name[5:]) if name.startswith("chat:") else ("image-to-text", name)
        if not model:
            raise OptionError("hf-api: needs a model id, e.g. --model "
                              "hf-api:Salesforce/blip-image-captioning-large")
        self.model = model
        # raw JPEG bytes are the image-to-text request body; chat requests are JSON
        headers = {"Content-Type": "image/jpeg"} if self.task == "image-to-text" else None
        token = get_token()
        # a URL as `model` sends every request to that endpoint as is (Inference Endpoints, TGI, tests)
        self.client = InferenceClient(model=options.api_base or model, token=token,
                                      timeout=options.timeout, headers=headers)
        if options.api_base:
            where = _display_url(options.api_base)
            super().__init__(f"hf-api:{name}@{where.split('://', 1)[1]}", where, token, options)
        else:
            super().__init__(f"hf-api:{name}", "the Hugging Face Inference API", token, options)
            self._check_task()

    def _check_task(self) -> None:
        """Stop before the first image when no Inference Provider serves the model for this task."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        try:
            info = HfApi().model_info(self.model, expand=["inferenceProviderMapping"],
                                      token=self._secret, timeout=self.timeout)
        except GatedRepoError:
            raise AccessError(f"{self.model_id}: the model is gated; accept its terms on "
                              f"huggingface.co/{self.model} and set {self.credential}{self.login_hint}"
                              ) from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(f"{self.model_id}: no such model on the Hugging Face Hub (if it "
                                     f"is private, set {self.credential}{self.login_hint})") from None
        except Exception:  # noqa: BLE001 - the Hub being unreachable is for the requests to report
            return
        wanted = "conversational" if self.task == "chat" else self.task
        tasks = {m.task for m in info.inference_provider_mapping or [] if m.status != "error"}
        if wanted in tasks:
            return
        if not tasks:
            raise ModelNotFoundError(f"{self.model_id}: no Inference Provider serves this model; deploy "
                                     "it (Inference Endpoints, TGI, vLLM) and pass its URL with --api-base")
        other = {"conversational": f"hf-api:chat:{self.model}", "image-to-text": f"hf-api:{self.model}"}
        hint = "".join(f"; use --model {other[t]}" for t in sorted(tasks) if t in other)
        raise OptionError(f"{self.model_id}: Inference Providers serve this model for "
                          f"{', '.join(sorted(tasks))}, not {wanted}{hint}")

    def caption(
        self,
        images: list[Image.Image],
        options: GenerationOptions,
        prompts: list[str | None] | None = None,
    ) -> list[Caption]:
        asked = any(prompts or [options.prompt]) or options.detail or options.system or options.language
        if self.task == "image-to-text" and (asked or options.candidates > 1):
            raise OptionError(f"{self.model_id}: image-to-text takes the image alone, so no --prompt, "
                              "--detail, --system, --language or --candidates; for a chat VLM use "
                              f"--model hf-api:chat:{self.model}")
        return super().caption(images, options, prompts)

    def _request(self, jpeg: bytes, options: GenerationOptions, prompt: str | None) -> list[str]:
        from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled

        try:
            if self.task == "chat":
                output = self.client.chat_completion(_messages(jpeg, prompt, options), model=self.model,
                                                     **_sampling(options))
                return [_text(choice.message.content) for choice in output.choices]
            return [_text(self.client.image_to_text(jpeg).generated_text)]
        except HfHubHTTPError as err:
            response = err.response
            message, code = _error_details(_content(response))
            retry_after = _retry_after(response.headers.get("Retry-After")) or _estimated_time(response)
            raise self._http_error(response.status_code, message or str(err).splitlines()[0],
                                   retry_after, code) from None
        except InferenceTimeoutError:
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except OfflineModeIsEnabled:
            raise OptionError("hf-api needs the network, but HF_HUB_OFFLINE is set; unset it") from None
        except (_Transient, _Rejected):
            raise
        except Exception as err:  # noqa: BLE001 - whatever else the client raises concerns this image
            raise _network_failure(err) or _Rejected(f"{type(err).__name__}: {err}") from None


def _jpeg(image: Image.Image) -> bytes:
    """The image as JPEG, its long side at most MAX_SIDE (servers scale down further themselves)."""
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _messages(jpeg: bytes, prompt: str | None, options: GenerationOptions) -> list[dict]:
    """An optional system turn, then a user turn with the instruction and the image as a data URL."""
    asked = prompt or INSTRUCTIONS[options.detail or "brief"]
    if options.language is not None:
        asked = f"{asked} Answer in {options.language.strip()}."
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    messages = [] if options.system is None else [{"role": "system", "content": options.system}]
    messages.append({"role": "user", "content": [{"type": "text", "text": asked},
                                                  {"type": "image_url", "image_url": {"url": url}}]})
    return messages


def _sampling(options: GenerationOptions) -> dict:
    """Chat-completion sampling fields; greedy unless --do-sample, as with local models."""
    fields: dict = {"max_tokens": options.max_new_tokens,
                    "temperature": (options.temperature or 1.0) if options.do_sample else 0.0}
    if options.top_p is not None:
        fields["top_p"] = options.top_p
    if options.seed is not None:
        fields["seed"] = options.seed
    if options.candidates > 1:
        fields["n"] = options.candidates
    return fields


def _caption(texts: list[str]) -> Caption:
    """The first answer is the caption; several answers are kept as candidates to score."""
    if not texts:
        raise _Rejected("the server answered with no choices")
    return Caption(texts[0], {"candidates": [{"text": text} for text in texts]} if len(texts) > 1 else {})


def _text(content: object) -> str:
    """The caption in a message's content: a string, or a list of parts (some servers)."""
    if isinstance(content, list):
        content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    text = content.strip() if isinstance(content, str) else ""
    if not text:
        raise _Rejected("the server answered with an empty caption")
    return text


def _error_details(body: bytes) -> tuple[str, object]:
    """Message and code of an error body: OpenAI's {"error": {...}}, vLLM's flat form, or plain text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300], None
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error), error.get("code")
    return str(error), None


def _read_quietly(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read()
    except (OSError, http.client.HTTPException):
        return b""


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content(response) -> bytes:
    try:
        return response.content
    except Exception:  # noqa: BLE001 - a body that cannot be read just means no details
        return b""


def _estimated_time(response) -> float | None:
    """The wait a loading Hugging Face model announces in its 503 body."""
    try:
        value = response.json().get("estimated_time")
    except Exception:  # noqa: BLE001 - any unreadable body just means no estimate
        return None
    return float(value) if isinstance(value, int | float) else None


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, so parallel requests do not retry in lockstep."""
    return min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** attempt) * random.uniform(0.5, 1.0)


def _network_failure(err: Exception) -> _Transient | None:
    """A refused or dropped connection, whichever HTTP library huggingface_hub uses (httpx or requests)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if "ConnectError" in names or type(err).__name__ == "ConnectionError":
        return _Transient(f"connection failed: {err}", unreachable=True)
    if "TransportError" in names or isinstance(err, OSError):
        return _Transient(f"connection dropped: {type(err).__name__}: {err}")
    return None


def _display_url(url: str) -> str:
    """The URL as messages and model ids show it: no query, no trailing slash."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        raise OptionError("--api-base: credentials in the URL are not supported (they would end up in "
                          "messages); set OPENAI_API_KEY or HF_TOKEN instead")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise OptionError(f"--api-base: {parts.netloc!r} has an invalid port") from None
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"
