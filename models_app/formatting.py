def format_duration(seconds: int | float | None) -> str:
    """Uptime and elapsed time for people, as `ollama ps` shows them: "12s", "5m 3s", "2h 5m", "1d 3h"."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
