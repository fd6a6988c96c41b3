"""The product's one size rule and duration format for templates (models_app/formatting.py):
`{{ gpu.memory_total_mib|mib }}` -> "24.0 GiB", `{{ record.duration_ms|ms }}` -> "37.3 s"."""

from django import template

from models_app.formatting import format_mib, format_ms

register = template.Library()
register.filter("mib", format_mib)
register.filter("ms", format_ms)
