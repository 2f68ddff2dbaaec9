"""The serving config: one dataclass for `dreamfleet serve` flags and the deployments."""

from __future__ import annotations

from dataclasses import dataclass

from dreamfleet.core.config import cfg
from dreamfleet.core.errors import ConfigError

PROFUSION_JOB_RUN_ID = "profusion-http"  # the registry run id of subjects customised over HTTP


@dataclass
class ServeConfig:
    registry: str = cfg("", "registry folder or URI to serve experts from")
    host: str = cfg("127.0.0.1", "HTTP bind address")
    port: int = cfg(8000, "HTTP port")
    replicas: int = cfg(1, "model replicas (each holds one base pipeline and an LRU of experts)")
    max_models_per_replica: int = cfg(8, "full fine-tunes and PEFT adapters kept on the device per replica (plain "
                                         "LoRA experts share one bank, bounded by host_cache_size)")
    host_cache_size: int = cfg(64, "experts kept in host memory per replica, so a swap does not touch the disk; "
                                   "also the Ray Serve multiplexing LRU that routes requests to replicas")
    max_batch_size: int = cfg(8, "requests (for any experts) that arrive together, rendered in one engine call: "
                                 "plain LoRA experts of one base model share one denoiser pass")
    batch_wait_s: float = cfg(0.01, "how long a batch waits for more requests")
    cpus_per_replica: float = cfg(0.0, "CPUs reserved per model replica (0: share the node)")
    gpus_per_replica: float = cfg(0.0, "GPUs per model replica")
    keys: str | None = cfg(None, "API keys file (default: <registry>/serving/keys.json on a local registry)")
    insecure: bool = cfg(False, "allow binding a non-loopback address without API keys")
    max_steps: int = cfg(100, "largest steps a request may ask for")
    max_images: int = cfg(8, "largest num_images / n")
    min_side: int = cfg(8, "smallest width/height on any expert")
    min_side_fraction: float = cfg(0.5, "each expert's smallest width/height, as a fraction of its base model's "
                                        "native side (smaller renders come out broken)")
    max_side: int = cfg(1024, "largest width/height")
    max_body_bytes: int = cfg(12_000_000, "largest request body (room for 8 demonstrations of max_demo_bytes)")
    apprentice: str | None = cfg(None, "apprentice folder: serve requests with 'demonstrations' instead of 'subject'")
    max_demo_bytes: int = cfg(1_000_000, "largest demonstration image (decoded base64 bytes)")
    max_demo_side: int = cfg(2048, "largest demonstration width/height in px")
    default_steps: int = cfg(25, "steps when a request does not say")
    default_guidance_scale: float = cfg(7.5, "classifier-free guidance when a request does not say")
    registry_ttl_s: float = cfg(2.0, "how long registry reads are cached; new experts appear within this")
    promptnet: str | None = cfg(None, "pre-trained PromptNet folder: enables the one-photo flow, POST /v1/profusion/jobs")
    profusion_steps: int = cfg(100, "customisation steps of a one-photo job (ProFusion's 100)")
    profusion_views: int = cfg(31, "augmented views of a one-photo job's photo")
    profusion_batch_size: int = cfg(4, "views per customisation step")
    max_profusion_jobs: int = cfg(2, "one-photo customisations running at once (more answer 429)")
    request_timeout_s: float = cfg(120.0, "deadline of a generation request (504 past it); a client may ask for "
                                          "another with the X-Request-Timeout header, up to max_request_timeout_s")
    max_request_timeout_s: float = cfg(600.0, "longest deadline a request may ask for")
    max_pixel_steps: int = cfg(16_777_216, "largest width * height * steps * images of one request (422 past it): "
                                           "bounds the work one request can make")
    max_ongoing_requests: int = cfg(32, "requests a model replica works on at once (Ray Serve max_ongoing_requests)")
    max_queued_requests: int = cfg(64, "requests waiting for a model replica; more answer 503 with Retry-After")
    rate_limit_per_min: float = cfg(600.0, "generation requests per minute per tenant (429 past it; 0: no limit)")
    rate_limit_burst: int = cfg(60, "requests a tenant may send at once above its rate")

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_models_per_replica < 1 or self.max_batch_size < 1:
            raise ConfigError("replicas, max_models_per_replica and max_batch_size must be at least 1")
        if self.batch_wait_s < 0:  # the replicas set it on their batch queue (Ray checks only at decoration)
            raise ConfigError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if self.min_side % 8 or self.max_side % 8 or self.min_side > self.max_side:
            raise ConfigError("min_side and max_side must be multiples of 8 with min_side <= max_side")
        if not 0 < self.min_side_fraction <= 1:
            raise ConfigError(f"min_side_fraction must be in (0, 1], got {self.min_side_fraction}")
        if not 0 < self.request_timeout_s <= self.max_request_timeout_s:
            raise ConfigError("request_timeout_s must be > 0 and at most max_request_timeout_s")
        if min(self.max_pixel_steps, self.max_ongoing_requests, self.max_queued_requests, self.rate_limit_burst) < 1:
            raise ConfigError("max_pixel_steps, max_ongoing_requests, max_queued_requests and rate_limit_burst "
                              "must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
