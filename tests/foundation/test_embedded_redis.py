import psutil
import redis

from llamacontroller_site.embedded_redis import EmbeddedRedis


def test_embedded_redis_starts_serves_and_stops_without_leftovers():
    server = EmbeddedRedis().start()
    pid = server.process.pid
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert server.url.startswith("redis://127.0.0.1:")
    finally:
        server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not server.ping()
