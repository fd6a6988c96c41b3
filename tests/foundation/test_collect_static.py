"""The run command's collectstatic takes the checkout's lock: every start from one checkout writes the same
STATIC_ROOT, and two unlocked runs at once failed in 3 of 7 pairs (FileNotFoundError for a hashed
file the other run had just replaced)."""

import fcntl
import subprocess

from tests.conftest import REPO, worker_env
from tests.helpers import COLLECT_STATIC, wait_until

# The run command's settings (llamacontroller_site/settings.py: STATIC_ROOT = BASE_DIR / "staticfiles"), which
# the command below runs with; the tests' own settings collect nowhere.
LOCK = REPO / "staticfiles.lock"
MANIFEST = REPO / "staticfiles" / "staticfiles.json"


def waits_for_a_lock(pid: int) -> bool:
    """/proc/locks lists a process blocked in flock() as "-> FLOCK ... <pid> ..."."""
    with open("/proc/locks") as locks:
        return any("->" in line and f" {pid} " in line for line in locks)


def test_a_second_collectstatic_waits_for_the_first():
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a start that is collecting now holds it
        waiting = subprocess.Popen(COLLECT_STATIC, cwd=REPO, env=worker_env(), stderr=subprocess.PIPE)
        try:
            wait_until(lambda: waits_for_a_lock(waiting.pid) or waiting.poll() is not None, timeout=60)
            assert waiting.poll() is None, "collectstatic ran while another one held the lock"
        except BaseException:
            waiting.kill()
            raise
    # The lock released: it runs now, to the end.
    _, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, stderr.decode()[-2000:]
    assert MANIFEST.exists()
