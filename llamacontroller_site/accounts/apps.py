from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "llamacontroller_site.accounts"
    label = "accounts"
    verbose_name = "Team access"
