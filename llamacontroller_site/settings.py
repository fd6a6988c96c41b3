"""Settings for LlamaController. Every knob comes from the environment (see README, .env.example);
bad values stop start-up with an error naming the variable."""

import os
import socket
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import envbool, envchoice, envint, envlist, envrange, envstr

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = envbool("DEBUG", False)

# The data folder holds the SQLite database, instance logs, the generated secret key and test models.
DATA_DIR = Path(envstr("LLAMACONTROLLER_DATA_DIR", str(BASE_DIR / "data"))).resolve()


def _secret_key() -> str:
    key = os.environ.get("SECRET_KEY", "").strip()
    if key:
        return key
    # The local run command generates one and keeps it here; a production run sets SECRET_KEY.
    key_file = DATA_DIR / "secret_key"
    if key_file.is_file():
        return key_file.read_text().strip()
    raise ImproperlyConfigured(
        f"SECRET_KEY is not set (and no generated key exists in {DATA_DIR}): set SECRET_KEY to a long random "
        "string, or run management commands as `./lc.sh manage COMMAND` (the run command's settings)"
    )


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "axes",
    "accounts",
    "gpus",
    "models_app",
    "gateway",
    "policy",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "llamacontroller_site.static_files.AsyncWhiteNoiseMiddleware",  # WhiteNoise, without a thread per request
    "llamacontroller_site.input_guard.InputGuardMiddleware",  # NUL in a parameter: 400; a 403 logs one line
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last: turns a refused login (a locked username and address) into the "locked" page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "llamacontroller_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "llamacontroller_site.wsgi.application"

# Database: SQLite in the data folder unless DATABASE_URL names another.
_database_url = envstr("DATABASE_URL", "")
# PostgreSQL: a bounded connection pool per process (psycopg_pool; README "Configuration"). Every thread that
# uses the database borrows from it and gives back at the end of its request or task: at most DB_POOL_SIZE
# connections per process, and a borrower that finds none free within DB_POOL_TIMEOUT seconds gets an error
# (answered 503) rather than waiting for ever. 0: no pool, a new connection for each request.
DB_POOL_SIZE = envint("LLAMACONTROLLER_DB_POOL_SIZE", 8, minimum=0, maximum=1000)
DB_POOL_TIMEOUT = envint("LLAMACONTROLLER_DB_POOL_TIMEOUT", 10, minimum=1, maximum=600)
if _database_url:
    try:
        # No persistent connections (conn_max_age=0): under ASGI every request thread kept its own, and one web
        # worker held 49 idle ones. The pool keeps the connections instead; its health check replaces Django's.
        DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=0, conn_health_checks=True)}
    except Exception as exc:  # dj_database_url raises several types for a malformed URL
        raise ImproperlyConfigured(f"DATABASE_URL={_database_url!r} is not a database URL: {exc}") from None
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DB_POOL_SIZE:
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": DB_POOL_SIZE,
            "timeout": DB_POOL_TIMEOUT,
            "max_idle": 60,  # connections above min_size close after a minute unused
        }
        from .db_pool import install_fork_guard

        install_fork_guard()  # a forked child (a Celery pool process) must not use its parent's pool
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DATA_DIR / "db.sqlite3"}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat write at once: WAL, a busy timeout and immediate transactions.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# axes first: it refuses a locked (username, address) pair before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = envstr("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
# One time format everywhere, the admin included: 24-hour clock, ISO dates (llamacontroller_site/formats/en).
FORMAT_MODULE_PATH = ["llamacontroller_site.formats"]

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "llamacontroller_site" / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
    # axes narrates every login at INFO; its warnings (failures, lockouts) are what an operator reads.
    "loggers": {"axes": {"level": "WARNING"}},
}

# --- REST API ---------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "llamacontroller_site.pagination.StrictLimitOffsetPagination",
    "DEFAULT_FILTER_BACKENDS": ["utilities.query.RefuseNulCharacters"],
    "PAGE_SIZE": 100,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LlamaController API",
    "DESCRIPTION": "Load llama.cpp models onto GPUs and see the memory each one really uses.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # One name for the up/down choice of a host, wherever it appears (hosts, GPUs, instances).
    "ENUM_NAME_OVERRIDES": {"HostStateEnum": ["up", "down"]},
    # The errors each operation may answer (400/401/403/404) are part of the schema.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "llamacontroller_site.openapi.document_errors",
        "gateway.openapi.add_gateway_routes",  # the gateway's plain Django views, in their own tags
    ],
}

# --- Redis and Celery -------------------------------------------------------------------------------
# REDIS_URL unset: the run command starts an embedded server and records its URL in the data folder,
# so management commands in another terminal reach the same broker.
EMBEDDED_REDIS_URL_FILE = DATA_DIR / "embedded-redis.url"
REDIS_URL = envstr("REDIS_URL", "")
if not REDIS_URL:
    REDIS_URL = (
        EMBEDDED_REDIS_URL_FILE.read_text().strip()
        if EMBEDDED_REDIS_URL_FILE.is_file()
        else "redis://127.0.0.1:6379/0"
    )
if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(f"REDIS_URL={REDIS_URL!r} is not a redis:// URL")

HOST_NAME = envstr("LLAMACONTROLLER_HOST_NAME", socket.gethostname().split(".")[0])
HOST_QUEUE = f"host.{HOST_NAME}"

GPU_REFRESH_SECONDS = envint("LLAMACONTROLLER_GPU_REFRESH_SECONDS", 15, minimum=1)
# Live figures (models_app/live.py): where a sample is cheap, each host's worker also refreshes its GPU rows and its
# models' memory this often (0: off); history samples and alert rules keep GPU_REFRESH_SECONDS.
GPU_LIVE_SECONDS = envint("LLAMACONTROLLER_GPU_LIVE_SECONDS", 2, minimum=0)
GPU_LIVE_BACKENDS = envlist("LLAMACONTROLLER_GPU_LIVE_BACKENDS", ["nvml", "fake"])
if not set(GPU_LIVE_BACKENDS) <= {"nvml", "nvidia-smi", "fake"}:
    raise ImproperlyConfigured(
        f"LLAMACONTROLLER_GPU_LIVE_BACKENDS={GPU_LIVE_BACKENDS}: use nvml, nvidia-smi, fake"
    )
RECONCILE_SECONDS = envint("LLAMACONTROLLER_RECONCILE_SECONDS", 10, minimum=1)
# Each host's worker lists the GGUF files of its model folders this often (models_app/folder_scan.py).
MODEL_SCAN_SECONDS = envint("LLAMACONTROLLER_MODEL_SCAN_SECONDS", 60, minimum=10)
SAMPLE_RETENTION_DAYS = envint("LLAMACONTROLLER_SAMPLE_RETENTION_DAYS", 30, minimum=1)
LOAD_TIMEOUT = envint("LLAMACONTROLLER_LOAD_TIMEOUT", 120, minimum=1)
STOP_TIMEOUT = envint("LLAMACONTROLLER_STOP_TIMEOUT", 10, minimum=1)
# Liveness (models_app/cluster.py). Each host's worker writes a heartbeat every HOST_HEARTBEAT_SECONDS; a host
# silent for HOST_TIMEOUT_SECONDS is down: its GPUs become unavailable, its running instances `unknown`, its
# pending and stopping instances fail, and loads and unloads to it are refused until it answers again.
HOST_HEARTBEAT_SECONDS = envint("LLAMACONTROLLER_HOST_HEARTBEAT_SECONDS", 5, minimum=1)
HOST_TIMEOUT_SECONDS = envint("LLAMACONTROLLER_HOST_TIMEOUT_SECONDS", 30, minimum=1)
if 3 * HOST_HEARTBEAT_SECONDS > HOST_TIMEOUT_SECONDS:
    raise ImproperlyConfigured(
        f"LLAMACONTROLLER_HOST_TIMEOUT_SECONDS={HOST_TIMEOUT_SECONDS} must be at least three heartbeats "
        f"(LLAMACONTROLLER_HOST_HEARTBEAT_SECONDS={HOST_HEARTBEAT_SECONDS})"
    )
# Where llama-server listens (--host), and how other nodes reach it when that is 0.0.0.0 (default: this
# machine's name). Instances are protected by their per-instance API key either way.
LLAMA_SERVER_HOST = envstr("LLAMACONTROLLER_LLAMA_SERVER_HOST", "127.0.0.1")
HOST_ADDRESS = envstr("LLAMACONTROLLER_HOST_ADDRESS", "")
# Tests and containers that share /etc/machine-id may set their own.
MACHINE_ID = envstr("LLAMACONTROLLER_MACHINE_ID", "")
HOST_CHECK_SECONDS = max(1, min(30, HOST_TIMEOUT_SECONDS // 4))
# Load on demand and idle unload (models_app/ondemand.py). Instances loaded on demand unload after this many
# idle seconds unless their model's registry entry sets its own keep_alive (0: they stay); a request's
# keep_alive is honoured up to the maximum. The gateway waits this long for a load on demand to be ready.
KEEP_ALIVE_SECONDS = envint("LLAMACONTROLLER_KEEP_ALIVE_SECONDS", 1800, minimum=0)
GATEWAY_MAX_KEEP_ALIVE_SECONDS = envint("LLAMACONTROLLER_GATEWAY_MAX_KEEP_ALIVE_SECONDS", 86400, minimum=0)
GATEWAY_LOAD_TIMEOUT_SECONDS = envint(
    "LLAMACONTROLLER_GATEWAY_LOAD_TIMEOUT_SECONDS", max(180, LOAD_TIMEOUT + 60), minimum=1
)
IDLE_CHECK_SECONDS = envint("LLAMACONTROLLER_IDLE_CHECK_SECONDS", 30, minimum=1)

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "default"
# Celery's Django fix-up closes every database connection after each task unless told to reuse them. On SQLite
# a pool process keeps its one connection instead (opening one cost ~1.5 ms of each load and unload); the
# worker closes one that failed after its task (models_app/tasks.py). PostgreSQL: as Celery does it.
CELERY_DB_REUSE_MAX = 10_000 if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3" else None
CELERY_TASK_TIME_LIMIT = LOAD_TIMEOUT + STOP_TIMEOUT + 120
CELERY_TASK_SOFT_TIME_LIMIT = LOAD_TIMEOUT + STOP_TIMEOUT + 60
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = 3
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 3, "socket_timeout": 5}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Beat as data: each entry expires before the next one is due, so a stalled worker does not pile work up.
# The dispatchers fan out to the queue of every host (host.<name>).
CELERY_BEAT_SCHEDULE = {
    "refresh-gpus": {
        "task": "models_app.tasks.dispatch_refresh",
        "schedule": GPU_REFRESH_SECONDS,
        "options": {"expires": GPU_REFRESH_SECONDS * 0.8},
    },
    "reconcile-instances": {
        "task": "models_app.tasks.dispatch_reconcile",
        "schedule": RECONCILE_SECONDS,
        "options": {"expires": RECONCILE_SECONDS * 0.8},
    },
    "scan-model-folders": {
        "task": "models_app.tasks.dispatch_folder_scans",
        "schedule": MODEL_SCAN_SECONDS,
        "options": {"expires": MODEL_SCAN_SECONDS * 0.8},
    },
    "check-hosts": {
        "task": "models_app.tasks.check_hosts",
        "schedule": HOST_CHECK_SECONDS,
        "options": {"expires": HOST_CHECK_SECONDS * 0.8},
    },
    "unload-idle": {
        "task": "models_app.tasks.unload_idle",
        "schedule": IDLE_CHECK_SECONDS,
        "options": {"expires": IDLE_CHECK_SECONDS * 0.8},
    },
    "prune-samples": {
        "task": "gpus.tasks.prune_samples",
        "schedule": 24 * 3600,
        "options": {"expires": 3600},
    },
    # Telemetry-failing alerts for every host (a silent host runs no refresh to notice itself); the other
    # rules are evaluated by each host's refresh right after it writes its rows.
    "telemetry-alerts": {
        "task": "gpus.tasks.evaluate_telemetry_alerts",
        "schedule": GPU_REFRESH_SECONDS,
        "options": {"expires": GPU_REFRESH_SECONDS * 0.8},
    },
    # Reservations (policy/): owners told during the notice period, their models unloaded at the start.
    "drain-reservations": {
        "task": "policy.tasks.drain_reservations",
        "schedule": 60,
        "options": {"expires": 48},
    },
    "prune-usage": {
        "task": "gateway.tasks.prune_usage",
        "schedule": 24 * 3600,
        "options": {"expires": 3600},
    },
}

# --- The controller's own knobs --------------------------------------------------------------------
GPU_BACKEND = envchoice("LLAMACONTROLLER_GPU_BACKEND", "auto", ["auto", "nvml", "nvidia-smi", "fake"])
FAKE_GPUS_FILE = envstr("LLAMACONTROLLER_FAKE_GPUS", "")
if GPU_BACKEND == "fake" and not FAKE_GPUS_FILE:
    raise ImproperlyConfigured(
        "LLAMACONTROLLER_GPU_BACKEND=fake needs LLAMACONTROLLER_FAKE_GPUS (a JSON file describing the GPUs)"
    )
GPU_QUERY_TIMEOUT = envint("LLAMACONTROLLER_GPU_QUERY_TIMEOUT", 5, minimum=1)
GPU_BUSY_MIB = envint("LLAMACONTROLLER_GPU_BUSY_MIB", 30, minimum=0)
# Sharing GPUs by memory (models_app/claims.py, admission.py). Each instance claims its estimate (or its measured
# memory, if larger) plus this headroom on every GPU it uses: a llama-server grows after its load by a few
# hundred MiB (the CUDA context's lazy modules, cuBLAS workspaces, allocator fragmentation, the compute buffer
# of a first long prompt), and the estimate of compute buffers is within ~15 %. 512 MiB covers that for models
# up to tens of GiB while costing ~2 % of a 24 GiB GPU per model.
GPU_HEADROOM_MIB = envint("LLAMACONTROLLER_GPU_HEADROOM_MIB", 512, minimum=0)
# on: several models per GPU where their claims fit; off: one model per GPU for the whole installation.
GPU_SHARING = envchoice("LLAMACONTROLLER_GPU_SHARING", "on", ["on", "off"]) == "on"
# pack: a model goes where it fits with the least memory left over (whole GPUs stay free for big models);
# spread: onto the emptiest GPU.
PLACEMENT = envchoice("LLAMACONTROLLER_PLACEMENT", "pack", ["pack", "spread"])
# Making room (models_app/room.py, eviction.py): a load that does not fit may unload idle models loaded on demand
# (or whose registry entry sets a keep-alive). Idle means no request in flight for this long: a chat's next turn
# usually comes within a minute, and evicting between turns costs the next one a whole load.
EVICT_MIN_IDLE_SECONDS = envint("LLAMACONTROLLER_EVICT_MIN_IDLE_SECONDS", 60, minimum=0)
# ...and loaded for at least this long, so that two models wanted in turn do not evict each other in a loop.
EVICT_MIN_RESIDENCY_SECONDS = envint("LLAMACONTROLLER_EVICT_MIN_RESIDENCY_SECONDS", 120, minimum=0)
MODEL_DIRS = [
    Path(p).resolve()
    for p in envlist("LLAMACONTROLLER_MODEL_DIRS", [str(DATA_DIR / "models")], separator=":")
]
LLAMA_SERVER = envstr("LLAMACONTROLLER_LLAMA_SERVER", "")
# Folders of allowed llama-server builds (`:`-separated): workers offer every llama-server* in them.
LLAMA_SERVER_DIRS = [
    Path(p).resolve() for p in envlist("LLAMACONTROLLER_LLAMA_SERVER_DIRS", [], separator=":")
]
PORT_RANGE = envrange("LLAMACONTROLLER_PORT_RANGE", (8081, 8180))
INSTANCE_LOG_DIR = DATA_DIR / "logs"
INSTANCE_LOG_MAX_BYTES = envint("LLAMACONTROLLER_LOG_MAX_BYTES", 10 * 1024 * 1024, minimum=4096)
DASHBOARD_REFRESH_SECONDS = envint("LLAMACONTROLLER_DASHBOARD_REFRESH_SECONDS", 3, minimum=1)
LOGIN_MAX_FAILURES = envint("LLAMACONTROLLER_LOGIN_MAX_FAILURES", 5, minimum=1)
LOGIN_LOCKOUT_SECONDS = envint("LLAMACONTROLLER_LOGIN_LOCKOUT_SECONDS", 900, minimum=1)
# --- The gateway (Ollama- and OpenAI-compatible endpoints) ---
# Connecting to an instance's llama-server must be quick; reading is unbounded while tokens flow (a long prompt
# can take minutes before its first token), but no request lasts longer than the overall cap.
GATEWAY_CONNECT_TIMEOUT = envint("LLAMACONTROLLER_GATEWAY_CONNECT_TIMEOUT", 5, minimum=1)
GATEWAY_MAX_REQUEST_SECONDS = envint("LLAMACONTROLLER_GATEWAY_MAX_REQUEST_SECONDS", 3600, minimum=1)
# Request bodies above this answer 413 (images travel base64 inside the JSON).
GATEWAY_MAX_BODY_BYTES = envint("LLAMACONTROLLER_GATEWAY_MAX_BODY_BYTES", 32 * 1024 * 1024, minimum=1024)
# Requests beyond an instance's parallel slots wait in a queue this long (per web worker); beyond it: 429.
GATEWAY_QUEUE_SIZE = envint("LLAMACONTROLLER_GATEWAY_QUEUE_SIZE", 16, minimum=0)
# Fair use (gateway/slots.py, gateway/fairness.py): the queue is served round-robin per user; a request waits at
# most this long for a slot (0: no limit), then gets 503 with Retry-After. Per-user requests and tokens per
# minute, counted per web worker (0: no limit); beyond them: 429 naming the limit, Retry-After its reset.
GATEWAY_MAX_QUEUE_SECONDS = envint("LLAMACONTROLLER_GATEWAY_MAX_QUEUE_SECONDS", 300, minimum=0)
GATEWAY_USER_REQUESTS_PER_MINUTE = envint("LLAMACONTROLLER_GATEWAY_USER_REQUESTS_PER_MINUTE", 0, minimum=0)
GATEWAY_USER_TOKENS_PER_MINUTE = envint("LLAMACONTROLLER_GATEWAY_USER_TOKENS_PER_MINUTE", 0, minimum=0)
# Per web worker, the gateway remembers a checked API token (its user and role) and a model's running instances
# this many seconds (0: not at all; read again in the background past half of it): a revoked token, a
# deactivated user or a changed role is refused within the token cache's time (an expiry is exact); a cached
# instance is checked against its row (still running, same start) by the in-flight count's UPDATE before a
# request is sent to it (gateway/access.py).
GATEWAY_TOKEN_CACHE_SECONDS = envint("LLAMACONTROLLER_GATEWAY_TOKEN_CACHE_SECONDS", 5, minimum=0, maximum=60)
GATEWAY_INSTANCE_CACHE_SECONDS = envint(
    "LLAMACONTROLLER_GATEWAY_INSTANCE_CACHE_SECONDS", 10, minimum=0, maximum=60
)
USAGE_RETENTION_DAYS = envint("LLAMACONTROLLER_USAGE_RETENTION_DAYS", 90, minimum=1)
# Proxies in front of the web server that append to X-Forwarded-For (0: REMOTE_ADDR is the client).
PROXY_COUNT = envint("LLAMACONTROLLER_PROXY_COUNT", 0, minimum=0)

# --- Alerts and metrics (gpus/alerts.py, /metrics) -------------------------------------------------
# Webhooks that get every fired and resolved alert as a JSON POST (Slack-compatible `text`), retried with
# backoff; e-mail goes to LLAMACONTROLLER_ALERT_EMAILS when Django's e-mail settings can send (EMAIL_HOST).
ALERT_WEBHOOK_URLS = envlist("LLAMACONTROLLER_ALERT_WEBHOOK_URLS", [])
for _url in ALERT_WEBHOOK_URLS:
    if not _url.startswith(("http://", "https://")):
        raise ImproperlyConfigured(f"LLAMACONTROLLER_ALERT_WEBHOOK_URLS: {_url!r} is not an http(s) URL")
ALERT_EMAILS = envlist("LLAMACONTROLLER_ALERT_EMAILS", [])
EMAIL_HOST = envstr("EMAIL_HOST", "")
EMAIL_PORT = envint("EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = envstr("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = envstr("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = envbool("EMAIL_USE_SSL", False)
DEFAULT_FROM_EMAIL = envstr("DEFAULT_FROM_EMAIL", "llamacontroller@localhost")
# /metrics answers a Bearer API token of any role, or these client addresses (IPs or CIDR networks,
# e.g. a Prometheus server) without one.
METRICS_ALLOWED_ADDRESSES = envlist("LLAMACONTROLLER_METRICS_ALLOWED_ADDRESSES", [])

# --- Login throttling (django-axes) -----------------------------------------------------------------
# Locked per (username, address): a stranger guessing the admin's password locks only that pair, and the
# admin still logs in from their own address. `manage.py axes_reset_username NAME` lifts a lock at once.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_FAILURE_LIMIT = LOGIN_MAX_FAILURES
AXES_COOLOFF_TIME = timedelta(seconds=LOGIN_LOCKOUT_SECONDS)
AXES_RESET_ON_SUCCESS = True
# Attempts refused while locked do not extend the lock, so it always ends LOGIN_LOCKOUT_SECONDS after
# the failure that set it.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_CLIENT_IP_CALLABLE = "accounts.throttle.client_ip"
AXES_LOCKOUT_CALLABLE = "accounts.throttle.lockout_response"
# Failed logins are audit events (InstanceEvent); axes keeps only the live counters, not a login log.
AXES_DISABLE_ACCESS_LOG = True
AXES_VERBOSE = False

# --- HTTPS ------------------------------------------------------------------------------------------
# LLAMACONTROLLER_HTTPS=1: users reach the site over HTTPS, usually through a TLS-terminating proxy that
# sets X-Forwarded-Proto (and overwrites any the client sent). Cookies are then never sent in clear,
# browsers are told to stay on HTTPS (HSTS), and plain-HTTP requests are redirected.
HTTPS = envbool("LLAMACONTROLLER_HTTPS", False)
if HTTPS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # A probe on the host itself may ask over plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SECURE_HSTS_SECONDS = envint("LLAMACONTROLLER_HSTS_SECONDS", 31536000, minimum=0)
    # Subdomains (and preload lists) commit every host of the domain to HTTPS: the domain owner's call.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("LLAMACONTROLLER_HSTS_INCLUDE_SUBDOMAINS", False)
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
    if not SECURE_HSTS_INCLUDE_SUBDOMAINS:
        SILENCED_SYSTEM_CHECKS.append("security.W005")
