"""How low the gateway's fixed CPU can go with what it keeps (issue 22's "≤ 2 ms per request with cached token
and instance"): this checkout beside copies of it with parts taken out, in the same rounds of bench/gateway.py:

- `@no-statements` (bench/floor/no-statements.diff): the request's three statements skipped, the in-flight
  count's two UPDATEs (way in, way out) and the usage record's INSERT. The hops to a database thread stay.
- `@no-django-handler` (bench/floor/no-django-handler.diff): a token's request to /v1/chat/completions or
  /v1/completions goes from the ASGI entry straight to its view with a bare request object (method, the two
  headers the view reads, the body): no Django request, middleware, URL resolution or disconnect listener.
- `@long-caches` (bench/floor/long-caches.diff): the token and instance caches kept 60 s instead of 5 and
  10 s. Each entry is read again in the background once half its time has passed; at this benchmark's pace
  (a request to each path every second or two) that is a token and an instance read every few requests,
  which the default times put into the figures. 60 s is the target's "cached token and instance".
- `@all-three`: the three together.

These copies are measurements, not products: without the statements an idle unload may stop an instance in
use and no usage is recorded; without the handler there are no security headers, no host check and no
disconnect handling; with the long caches a revoked token works for up to a minute.

    .venv/bin/python bench/gateway_floor.py [bench/gateway.py's options: --pairs 30 --concurrent-runs 1 ...]

The copies are `git worktree`s of HEAD (commit what you measure) in a temporary folder, removed at the end.
A patch that no longer applies says so and stops the run."""

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "bench" / "floor"
VARIANTS = {
    "no-statements": ["no-statements.diff"],
    "no-django-handler": ["no-django-handler.diff"],
    "long-caches": ["long-caches.diff"],
    "all-three": ["no-statements.diff", "no-django-handler.diff", "long-caches.diff"],
}


def make_copy(path: Path, patches: list[str]) -> None:
    git = ["git", "-C", str(REPO)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), "HEAD"], check=True, capture_output=True)
    for patch in patches:
        applied = subprocess.run(["git", "-C", str(path), "apply", str(PATCHES / patch)], capture_output=True)
        if applied.returncode != 0:
            raise SystemExit(f"{patch} does not apply to HEAD any more: {applied.stderr.decode().strip()}")
    (path / ".venv").symlink_to(REPO / ".venv")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-floor-") as folder:
        made = []
        try:
            for name, patches in VARIANTS.items():
                path = Path(folder) / name
                made.append(path)
                make_copy(path, patches)
            command = [sys.executable, str(REPO / "bench" / "gateway.py"), "--model", "gemma", "--no-cold"]
            command += ["--no-memory", *sys.argv[1:]]
            for path in made:
                command += ["--checkout", str(path)]
            return subprocess.run(command).returncode
        finally:
            for path in made:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True
                )


if __name__ == "__main__":
    sys.exit(main())
