"""Test settings: the real settings module, read with a test environment."""

import atexit
import os
import tempfile

_data = tempfile.mkdtemp(prefix="llamacontroller-test-")
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("LLAMACONTROLLER_DATA_DIR", _data)
os.environ.setdefault("LLAMACONTROLLER_MODEL_DIRS", os.path.join(_data, "models"))
os.environ.setdefault("LLAMACONTROLLER_HOST_NAME", "testhost")
if not os.environ.get("REDIS_URL"):
    # No Redis given: the tests get their own embedded server, as the run command does.
    from llamacontroller_site.embedded_redis import EmbeddedRedis

    _redis = EmbeddedRedis().start()  # with a random password, like the run command's
    atexit.register(_redis.stop)
    os.environ["REDIS_URL"] = _redis.url

from llamacontroller_site.settings import *  # noqa: E402,F403
from llamacontroller_site.settings import DATABASES  # noqa: E402

# Beat tasks act once per period (utilities/periodic.py); tests call them directly, several times in a row.
PERIODIC_LOCKS = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# No collectstatic in tests: WhiteNoise serves from the finders, and its root exists (no warning per request).
STATIC_ROOT = os.path.join(_data, "static")
os.makedirs(STATIC_ROOT, exist_ok=True)
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# End-to-end tests run a Celery worker in another process: it must see the same test database,
# so SQLite's test database is a file, not memory.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(_data, "test-db.sqlite3")}


def _remove_data_dir():
    import shutil

    shutil.rmtree(_data, ignore_errors=True)


atexit.register(_remove_data_dir)
