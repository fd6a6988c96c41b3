from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    label = "accounts"
    verbose_name = "Team access"

    def ready(self):
        from . import schema, signals  # noqa: F401  (login signal receivers, the OpenAPI auth scheme)
